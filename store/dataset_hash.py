"""The content hash of a dataset version: what the dataset says, never how its files happen to be laid out.

    content_hash(manifest, *stored_digests(version_path))   # "sha256:..." (what `DatasetVersion.verify` checks)

sha256 over the header (format, kind, config, tokenizer fingerprint, counts, drops, pending rollouts) as
sorted-key JSON, then a digest of `tokens` (per rollout, combined in rollout_id order) and of `samples`
(sorted by rollout_id, window_idx). Each column is fed as little-endian values + lengths + null flags, so
chunking, slicing and Parquet encoding do not change it, and a rebuild from the same events gives the same hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from store.dataset_layout import SAMPLES, TOKENS, DatasetError


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _type_tag(t: pa.DataType) -> str:
    """The type without list field names (Parquet says `element`, DuckDB `l`, pyarrow `item`)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_tag(t.value_type)}>"
    return "string" if pa.types.is_large_string(t) else str(t)


def _update(h, arr: pa.Array) -> None:
    """Feeds one column to a hash in a form that depends on values only (not chunks, slices or buffers)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    h.update(f"{_type_tag(t)}|{len(arr)}|{arr.null_count}|".encode())
    if arr.null_count:
        h.update(np.packbits(arr.is_null().to_numpy(zero_copy_only=False)).tobytes())
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        h.update(np.ascontiguousarray(pc.fill_null(pc.list_value_length(arr), 0).to_numpy(), "<i8"))
        _update(h, arr.flatten())
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        vals = [b"" if s is None else s.encode() for s in arr.to_pylist()]
        h.update(np.array([len(v) for v in vals], "<i8").tobytes() + b"".join(vals))
    elif pa.types.is_boolean(t):
        h.update(np.packbits(pc.fill_null(arr, False).to_numpy(zero_copy_only=False)).tobytes())
    else:  # fixed-width numbers: nulls read as 0 (their flags are hashed above)
        vals = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)
        h.update(np.ascontiguousarray(vals, vals.dtype.newbyteorder("<")))


def table_digest(table: pa.Table) -> str:
    h = hashlib.sha256()
    for name in table.column_names:
        h.update(name.encode() + b"\0")
        _update(h, table.column(name))
    return h.hexdigest()


def tokens_row_digests(table: pa.Table) -> list[tuple[str, str]]:
    """(rollout_id, digest of its row) for each row of a tokens table: combined later in rollout order."""
    ids = table.column("rollout_id").to_pylist()
    return [(rid, table_digest(table.slice(i, 1))) for i, rid in enumerate(ids)]


def combine_row_digests(digests: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for rid, d in sorted(digests):
        h.update(f"{rid}\0{d}\n".encode())
    return h.hexdigest()


def samples_digest(table: pa.Table) -> str:
    order = pc.sort_indices(table, [("rollout_id", "ascending"), ("window_idx", "ascending")])
    return table_digest(table.take(order))


HASHED = ("format", "kind", "config", "tokenizer", "counts", "drops", "pending")


def content_hash(manifest: dict, tokens_digest: str, samples_digest_: str) -> str:
    header = canonical_json({k: manifest[k] for k in HASHED})
    h = hashlib.sha256(header + b"\ntokens " + tokens_digest.encode() + b"\nsamples " + samples_digest_.encode())
    return "sha256:" + h.hexdigest()


def stored_digests(path: Path) -> tuple[str, str]:
    """Recomputes (tokens digest, samples digest) from a version directory's Parquet files."""
    try:
        pf = pq.ParquetFile(path / TOKENS)
        digests = []
        for i in range(pf.num_row_groups):
            digests += tokens_row_digests(pf.read_row_group(i))
        return combine_row_digests(digests), samples_digest(pq.read_table(path / SAMPLES))
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{path}: dataset files are unreadable ({e})") from e
