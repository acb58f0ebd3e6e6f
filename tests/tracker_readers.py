"""Read a run's experiment trackers back with each tracker's own reader: TensorBoard's EventAccumulator,
MLflow's client on the file store, and W&B's offline run files (records in W&B's own protobuf, framed as a
LevelDB log: wandb 0.2x+ ships no Python reader, so the framing is read here, the records by wandb.proto)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_texts(run_dir: Path) -> dict[str, str]:
    """lineage/<key> -> its last text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        if tag.endswith("/text_summary"):
            out[tag[: -len("/text_summary")]] = acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
    return out


def mlflow_run(run_dir: Path):
    """(client, the one run in RUN_DIR/mlruns)."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("klong")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def mlflow_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    client, run = mlflow_run(run_dir)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}


def _wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B run file"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):  # FULL, or the LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_run(run_dir: Path) -> dict:
    """Every offline run file under RUN_DIR/wandb (a resumed run adds one): {"scalars": {key: [(step, value)]},
    "tags": set, "config": {key: value}, "ids": set of run ids}."""
    scalars: dict[str, list] = {}
    tags, config, ids = set(), {}, set()
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                for k, v in row.items():
                    if not k.startswith("_"):
                        scalars.setdefault(k, []).append((row["_step"], v))
            elif kind == "run":
                ids.add(rec.run.run_id)
                tags |= set(rec.run.tags)
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return {"scalars": {k: sorted(v) for k, v in scalars.items()}, "tags": tags, "config": config, "ids": ids}
