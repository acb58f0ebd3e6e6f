"""Reading a dataset version sample by sample: `open_version` verifies the content hash, then yields Samples.

    for s in open_version(home, "web-rl@3"):                  # verifies the content hash first
        s.input_ids, s.loss_mask, s.logprobs, s.advantage     # int32 [n], uint8 [n], float32 [n], float

Each window is materialized from its rollout's tokens row with `store.windows.materialize_flat` (input =
prefix ++ spans) and checked against its recorded counts. The trainer reads versions its own, faster way
(trainer.reader); this reader is the reference (exports, replay, tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store.dataset_hash import content_hash, stored_digests
from store.dataset_layout import (SAMPLES, SAMPLES_SCHEMA, TOKENS, DatasetError, _fetched, load_manifest, parse_ref,
                                  version_dir)
from store.windows import SplitResult, Window, materialize_flat


@dataclass(frozen=True)
class Sample:
    """One sub-trajectory, ready for a trainer."""

    rollout_id: str
    window_idx: int
    group_id: str
    input_ids: np.ndarray  # int32 [n_tokens]: prefix ++ window
    loss_mask: np.ndarray  # uint8 [n_tokens]
    logprobs: Optional[np.ndarray]  # float32 [n_tokens]: behaviour logprobs, NaN where none (rl only)
    q: float  # NaN in sft datasets
    advantage: float  # NaN in sft datasets
    policy_version: int
    staleness: int


class DatasetVersion:
    def __init__(self, home: Path | str, ref: str):
        self.name, self.version = parse_ref(home, ref)
        self.ref = f"{self.name}@{self.version}"
        self.path = version_dir(home, self.name, self.version)
        self.manifest = load_manifest(home, self.ref)

    def actual_hash(self) -> str:
        """The content hash of what the files hold now (reads every file once)."""
        return content_hash(self.manifest, *stored_digests(self.path))

    def verify(self) -> None:
        actual = self.actual_hash()
        if actual != self.manifest["content_hash"]:
            raise DatasetError(f"{self.ref}: files do not match the manifest's content hash "
                               f"({actual[:19]}... != {self.manifest['content_hash'][:19]}...): the dataset was "
                               "modified or corrupted; rebuild it (`klong replay` shows what differs)")

    def samples(self) -> pa.Table:
        return pq.read_table(self.path / SAMPLES)

    def __len__(self) -> int:
        return self.manifest["counts"]["samples"]

    def __iter__(self) -> Iterator[Sample]:
        samples = self.samples()
        by_rollout: dict[str, list[int]] = {}
        for i, rid in enumerate(samples.column("rollout_id").to_pylist()):
            by_rollout.setdefault(rid, []).append(i)
        cols = {c: samples.column(c).to_pylist() for c in SAMPLES_SCHEMA.names if not c.startswith("span_")}
        spans = [samples.column(c) for c in ("span_step", "span_start", "span_end", "span_loss")]
        max_tokens = self.manifest["config"]["max_tokens"]
        pf = pq.ParquetFile(self.path / TOKENS)
        for g in range(pf.num_row_groups):
            rows = pf.read_row_group(g)
            for r in range(rows.num_rows):
                row = rows.slice(r, 1)
                rid = row.column("rollout_id")[0].as_py()
                offsets = row.column("step_offsets")[0].values.to_numpy()
                is_asst = row.column("step_assistant")[0].values.to_numpy(zero_copy_only=False)
                tokens = row.column("token_ids")[0].values.to_numpy()
                lp = (row.column("logprobs")[0].values.to_numpy(zero_copy_only=False).astype(np.float32)
                      if "logprobs" in rows.column_names else None)
                p = row.column("prefix_len")[0].as_py()
                n = np.diff(offsets)
                sampled = ((row.column("step_loss_start")[0].values.to_numpy(), row.column("step_loss_end")[0].values.to_numpy())
                           if "step_loss_start" in rows.column_names else None)
                prefix = np.column_stack([np.arange(p), np.zeros(p, np.int64), n[:p], is_asst[:p]]).astype(np.int64)
                result = SplitResult(p, int(n[:p].sum()), prefix, max_tokens - int(n[:p].sum()), [], {})
                positions = np.arange(len(tokens), dtype=np.int64)
                for i in by_rollout.get(rid, []):
                    sp = np.column_stack([spans[0][i].values.to_numpy(), spans[1][i].values.to_numpy(),
                                          spans[2][i].values.to_numpy(),
                                          spans[3][i].values.to_numpy(zero_copy_only=False)]).astype(np.int64)
                    w = Window(cols["window_idx"][i], cols["first_turn"][i], cols["last_turn"][i], cols["n_turns"][i],
                               cols["first_step"][i], cols["last_step"][i], sp, cols["n_tokens"][i],
                               cols["n_loss_tokens"][i], cols["obs_truncated"][i], cols["prefix_loss"][i])
                    pos, mask = materialize_flat(result, w, positions, offsets, sampled)
                    if len(pos) != w.n_tokens or int(mask.sum()) != w.n_loss_tokens:
                        raise DatasetError(f"{self.ref}: window {rid}/{w.window_idx} does not add up to its "
                                           f"n_tokens/n_loss_tokens")
                    yield Sample(rid, w.window_idx, cols["group_id"][i], tokens[pos].astype(np.int32), mask,
                                 None if lp is None else lp[pos], _f(cols["q"][i]), _f(cols["advantage"][i]),
                                 cols["policy_version"][i], cols["staleness"][i])


def _f(x: Optional[float]) -> float:
    return float("nan") if x is None else float(x)


def open_version(home: Path | str, ref: str, verify: bool = True, archive=None) -> DatasetVersion:
    """A dataset version to iterate (yields `Sample`s). `verify` (default) recomputes the content hash from
    the files first and refuses (DatasetError) when they do not match the manifest. With `archive` in a
    bucket, a version only there is fetched into the cache first (store.datasets_s3)."""
    _fetched(home, ref, archive)
    v = DatasetVersion(home, ref)
    if verify:
        v.verify()
    return v
