"""Exact, pre-tokenized exports of a dataset version for other trainers (Hugging Face, TRL, verl).

    klong dataset export web-sft@3 --format trl -o out/         # -> out/data/train-00000-of-00001.parquet
    >>> export_dataset(home, "web-sft@3", "trl", "out/")          # -> ExportReport
    >>> datasets.load_dataset("parquet", data_files="out/data/*.parquet", split="train")

Every sample (window) is one row. Its tokens and loss mask are exactly what `klong train` feeds its model:
they come from the trainer's own reader (`trainer.data.DatasetReader`, which verifies the content hash
first), gathered for many samples at once with numpy (no per-token Python), so an export runs at about
the speed of writing its Parquet. The loss mask is the trainer's: 1 on assistant tokens of the window
(and prefix assistant tokens where `prefix_loss` says so), 0 on position 0 (nothing predicts it); RL
datasets add the behaviour logprobs and `has_logprob` (0 on action tokens that have none: text-only imports,
markup a chat template adds after a completion; `klong train` with `loss.old_logprobs: behaviour` leaves
those out of the loss, its default `recompute` trains them, like this mask). Column names per format
(`FORMATS`): TRL's `assistant_masks` / `completion_mask`, HF's `labels` (-100 off the loss), verl's
`response_mask`, `old_log_probs`, per-token `advantages` and `uid` (the GRPO group). Every format also
carries the sample's identity and numbers (rollout_id, window_idx, group_id, q, advantage, ...), and with
`--messages` the window as chat messages (`trainer.export_messages`). verl's own dataset classes read chat,
not token columns: with `settings`, a verl export adds `messages` (MultiTurnSFTDataset), `prompt`,
`reward_model`, `extra_info`, `ability` (RLHFDataset) (`trainer.export_verl`), and every verl export holds
`klong_verl_dataset.py`, a class verl's `data.custom_cls` loads to train on the token columns as they are.

Files: `DIR/data/train-NNNNN-of-MMMMM.parquet` (the Hugging Face Hub layout; shards of ~`shard_tokens`
tokens) and `DIR/klong_export.json` (source ref and content hash, format, columns, counts). The export is
written beside DIR and renamed into place whole; an existing non-empty DIR is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.errors import ConfigError
from store import datasets as ds
from trainer.data import DatasetReader

FORMATS = ("hf", "trl", "verl")
MANIFEST = "klong_export.json"
SHARD_TOKENS = 64 << 20  # tokens per output file (~0.3-0.5 GB of Parquet before compression)
CHUNK_TOKENS = 4 << 20  # tokens assembled in memory at once (one Parquet row group)
META_COLUMNS = ("rollout_id", "window_idx", "group_id", "task_id", "stage", "iteration", "first_step", "last_step",
                "n_tokens", "n_loss_tokens", "obs_truncated", "q", "advantage", "policy_version", "staleness")


@dataclass(frozen=True)
class ExportReport:
    ref: str
    content_hash: str
    format: str
    directory: Path
    files: list[Path]
    samples: int
    tokens: int
    loss_tokens: int
    bytes: int
    messages_left_out: Optional[int] = None  # 0 with a messages column (never null); None: no messages column


@dataclass(frozen=True)
class Chunk:
    """Samples [a, b) of a reader, flat: values of all rows back to back, `offsets` int32 [rows + 1]."""
    offsets: np.ndarray
    input_ids: np.ndarray  # int32 [tokens]
    loss_mask: np.ndarray  # int8 [tokens]: the trainer's loss tokens
    logprobs: Optional[np.ndarray]  # float32 [tokens] (rl): behaviour logprob, 0 where none
    has_logprob: Optional[np.ndarray]  # int8 [tokens] (rl): 1 where a behaviour logprob was recorded
    advantage: Optional[np.ndarray]  # float32 [rows] (rl)


def _excl_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x), np.int64)
    np.cumsum(x[:-1], out=out[1:])
    return out


def gather(reader: DatasetReader, a: int, b: int) -> Chunk:
    """Samples [a, b) as flat arrays: the same ids and loss mask as `reader.batch` gives each sample unpadded."""
    c0, c1 = reader.copy_off[a], reader.copy_off[b]
    src, ln = reader.copy_src[c0:c1], reader.copy_len[c0:c1]
    idx = np.repeat(src - _excl_cumsum(ln), ln) + np.arange(int(ln.sum()), dtype=np.int64)
    r0, r1 = reader.run_off[a], reader.run_off[b]
    mask = np.repeat(reader.run_flag[r0:r1].astype(np.int8), reader.run_len[r0:r1])
    lengths = reader.lengths[a:b]
    offsets = np.zeros(b - a + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    starts = offsets[:-1][lengths > 0]
    mask[starts] = 0  # nothing predicts position 0 (the trainer's rule)
    lp = has = adv = None
    if reader.logprobs is not None:
        lp, has, adv = reader.logprobs[idx], reader.has_logprob[idx].astype(np.int8), reader.advantage[a:b]
    return Chunk(offsets.astype(np.int32), reader.tokens[idx], mask, lp, has, adv)


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))


def columns(fmt: str, kind: str, chunk: Chunk) -> dict[str, pa.Array]:
    """The format's token columns for one chunk."""
    off, ids, mask = chunk.offsets, chunk.input_ids, chunk.loss_mask
    out = {"input_ids": _lists(off, ids)}
    rows = len(off) - 1
    if fmt == "trl":
        out["assistant_masks"] = out["completion_mask"] = _lists(off, mask)
    elif fmt == "hf":
        out["attention_mask"] = _lists(off, np.ones(len(ids), np.int8))
        out["labels"] = _lists(off, np.where(mask == 1, ids, np.int32(-100)).astype(np.int32))
        out["loss_mask"] = _lists(off, mask)
    elif fmt == "verl":
        out["attention_mask"] = _lists(off, np.ones(len(ids), np.int8))
        starts = np.repeat(off[:-1].astype(np.int64), np.diff(off))
        out["position_ids"] = _lists(off, (np.arange(len(ids), dtype=np.int64) - starts).astype(np.int32))
        out["response_mask"] = _lists(off, mask)
    if kind == "rl":
        per_token_adv = np.repeat(chunk.advantage, np.diff(off)) * mask
        lp_name = {"trl": "old_per_token_logps", "hf": "logprobs", "verl": "old_log_probs"}[fmt]
        out[lp_name] = _lists(off, chunk.logprobs)
        out["has_logprob"] = _lists(off, chunk.has_logprob)
        if fmt == "verl":
            out["advantages"] = _lists(off, per_token_adv.astype(np.float32))
        else:
            out["advantages"] = pa.array(chunk.advantage.astype(np.float32)) if rows else pa.array([], pa.float32())
    return out


def _plan(lengths: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive sample ranges of at most `budget` tokens each (at least one sample)."""
    out, a, acc = [], 0, 0
    for j, n in enumerate(lengths.tolist()):
        if j > a and acc + n > budget:
            out.append((a, j))
            a, acc = j, 0
        acc += n
    if a < len(lengths):
        out.append((a, len(lengths)))
    return out


def export_dataset(home: Path | str, ref: str, fmt: str, directory: Path | str, *, shard_tokens: int = SHARD_TOKENS,
                   chunk_tokens: int = CHUNK_TOKENS, compression: str = "zstd", settings=None, archive=None,
                   progress: Callable[[int], None] = lambda n: None) -> ExportReport:
    """Writes the export of dataset version `ref` into `directory` (created; must not hold files). With
    `settings` (whose archive holds the dataset's events), also the chat columns: `messages`
    (`trainer.export_messages`), and for verl those its own dataset classes read (`trainer.export_verl`)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty directory: export into a new one")
    # Verifies the files against the manifest's content hash. need_behaviour=False: the loss mask keeps action
    # tokens without a behaviour logprob, as `klong train` does by default (old logprobs recomputed);
    # `has_logprob` says which tokens have one, for a trainer that uses the behaviour logprobs instead.
    reader = DatasetReader(home, ref, need_behaviour=False, archive=archive)  # a bucket's version: fetched
    meta = pq.read_table(reader.path / ds.SAMPLES, columns=list(META_COLUMNS))  # rows in the reader's order
    meta = meta.append_column("dataset", pa.array([reader.ref] * meta.num_rows, pa.string()))
    if fmt == "verl":
        meta = meta.append_column("uid", meta.column("group_id")).append_column(
            "data_source", pa.array([f"klong:{reader.ref}"] * meta.num_rows, pa.string()))
    messages_left_out = None
    if settings is not None and fmt == "verl":  # what verl's own dataset classes read (trainer.export_verl)
        from trainer.export_verl import verl_columns

        for name, col in verl_columns(settings, reader.path, meta, reader.ref).items():
            meta = meta.append_column(name, col)
        messages_left_out = 0
    elif settings is not None:
        from trainer.export_messages import messages_column

        msgs, messages_left_out = messages_column(settings, reader.path)
        meta = meta.append_column("messages", msgs)
    shards = _plan(reader.lengths, shard_tokens) or [(0, 0)]
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    (tmp / "data").mkdir(parents=True)
    files, loss_tokens, done = [], 0, 0
    try:
        for k, (a, b) in enumerate(shards):
            path = tmp / "data" / f"train-{k:05d}-of-{len(shards):05d}.parquet"
            writer = None
            for ca, cb in _plan(reader.lengths[a:b], chunk_tokens) or [(0, 0)]:
                chunk = gather(reader, a + ca, a + cb)
                loss_tokens += int(chunk.loss_mask.sum())
                cols = columns(fmt, reader.kind, chunk)
                table = pa.table(cols)
                for name in meta.column_names:
                    table = table.append_column(name, meta.column(name).slice(a + ca, cb - ca))
                if writer is None:
                    writer = pq.ParquetWriter(path, table.schema, compression=compression)
                writer.write_table(table, row_group_size=max(1, table.num_rows))
                done += cb - ca
                progress(done)
            writer.close()
            files.append(path)
        manifest = {"source": reader.ref, "content_hash": reader.content_hash, "kind": reader.kind, "format": fmt,
                    "samples": len(reader), "tokens": int(reader.lengths.sum()), "loss_tokens": loss_tokens,
                    "messages_left_out": messages_left_out,
                    "columns": {f.name: str(f.type) for f in pq.read_schema(files[0])},
                    "files": [str(p.relative_to(tmp)) for p in files]}
        if fmt == "verl":
            from trainer.export_verl import DATASET_CLASS, DATASET_FILE, write_dataset_class

            write_dataset_class(tmp)
            manifest["verl_custom_cls"] = {"path": DATASET_FILE, "name": DATASET_CLASS}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = [out / p.relative_to(tmp) for p in files]
    return ExportReport(reader.ref, reader.content_hash, fmt, out, final, len(reader), int(reader.lengths.sum()),
                        loss_tokens, sum(p.stat().st_size for p in final), messages_left_out)
