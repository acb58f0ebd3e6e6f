"""Writing a dataset version: a scratch build directory, the two Parquet files, and the atomic publish.

    build = new_build_dir(home)                  # HOME/datasets/_tmp/<uuid>/
    w = TokensWriter(build / TOKENS, with_logprobs=True); w.write(table); tokens_digest = w.close()
    samples_digest = write_samples(build / SAMPLES, samples_table)
    n = publish(home, "web-rl", build, manifest)  # fsyncs, renames to NAME/v<N> (the next free N); returns N

Each writer returns the digest the content hash is built from (store.dataset_hash). A build killed half-way
leaves only its scratch directory, removed by a later build a day on.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.procs import fsync_path
from store.dataset_hash import combine_row_digests, samples_digest, tokens_row_digests
from store.dataset_layout import (MANIFEST, ROW_GROUP_TOKENS, SAMPLES_SCHEMA, TOKENS_SCHEMA, check_name,
                                  datasets_dir, versions)

_progress: list[Callable[[int, int], None]] = []  # called (rollouts, tokens) as a build writes; see report_progress


@contextmanager
def report_progress(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Within the block, every build (or replay) calls `callback(rollouts written, tokens written)` after each
    batch of tokens.parquet (from its writer thread): what `klong dataset build` shows as a progress bar."""
    _progress.append(callback)
    try:
        yield
    finally:
        _progress.remove(callback)


class TokensWriter:
    """Streams tokens rows into tokens.parquet (row groups of ~ROW_GROUP_TOKENS tokens), digesting each row."""

    def __init__(self, path: Path, with_logprobs: bool):
        self.schema = TOKENS_SCHEMA if with_logprobs else TOKENS_SCHEMA.remove(TOKENS_SCHEMA.get_field_index("logprobs"))
        # Dictionary encoding pays off on token ids (a vocabulary of ~1e5 ids packs into ~17 bits); on float
        # logprobs it would only cost time. Nested columns are named by their Parquet path.
        self._w = pq.ParquetWriter(path, self.schema, compression="zstd", write_statistics=["rollout_id"],
                                   use_dictionary=["rollout_id", "group_id", "task_id", "status",
                                                   "token_ids.list.element"])
        self.digests: list[tuple[str, str]] = []
        self.rows = self.tokens = 0

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self.digests += tokens_row_digests(table)
        n_tok = pc.list_value_length(table.column("token_ids")).to_numpy(zero_copy_only=False)
        self.rows += table.num_rows
        self.tokens += int(n_tok.sum())
        lo, acc = 0, 0
        for i, n in enumerate(n_tok.tolist()):
            acc += n
            if acc >= ROW_GROUP_TOKENS or i == len(n_tok) - 1:
                self._w.write_table(table.slice(lo, i + 1 - lo), row_group_size=i + 1 - lo)
                lo, acc = i + 1, 0
        for callback in list(_progress):
            callback(self.rows, self.tokens)

    def close(self) -> str:
        self._w.close()
        return combine_row_digests(self.digests)


def write_samples(path: Path, table: pa.Table) -> str:
    table = table.select(SAMPLES_SCHEMA.names).cast(SAMPLES_SCHEMA)
    pq.write_table(table, path, compression="zstd", row_group_size=1 << 16,
                   use_dictionary=["rollout_id", "group_id", "task_id"])
    return samples_digest(table)


def new_build_dir(home: Path | str, stale_after_s: float = 86_400) -> Path:
    """A fresh scratch directory for one build; leftovers of builds killed a day ago are removed."""
    tmp = datasets_dir(home) / "_tmp"
    for old in tmp.iterdir() if tmp.is_dir() else []:
        try:
            if time.time() - old.stat().st_mtime > stale_after_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue  # a concurrent build just renamed or removed it
    d = tmp / uuid.uuid4().hex
    d.mkdir(parents=True)
    return d


def publish(home: Path | str, name: str, build_dir: Path, manifest: dict, taken: list[int] = ()) -> int:
    """Renames a finished build directory to the next free `NAME/v<N>` (atomic); returns N. N is above every
    version here, in the cache, and in `taken` (the bucket's versions, store.datasets_s3)."""
    parent = datasets_dir(home) / check_name(name)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        version = max([0, *versions(home, name), *taken]) + 1
        manifest.update(name=name, version=version, ref=f"{name}@{version}")
        (build_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        for f in build_dir.iterdir():
            fsync_path(f)
        fsync_path(build_dir)
        try:
            os.rename(build_dir, parent / f"v{version}")
        except OSError:  # a concurrent build took v<N> (rename onto a non-empty directory fails): next one
            if (parent / f"v{version}").exists():
                continue
            raise
        fsync_path(parent)
        return version


def discard(build_dir: Path) -> None:
    shutil.rmtree(build_dir, ignore_errors=True)
