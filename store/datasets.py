"""Dataset versions: immutable, content-hashed Parquet under `HOME/datasets/NAME/v<N>/`, and their reader.

    klong dataset build web-rl --kind rl max_tokens=32768     # -> web-rl@3 (consumers.materialize)
    for s in open_version(home, "web-rl@3"):                  # verifies the content hash first
        s.input_ids, s.loss_mask, s.logprobs, s.advantage     # int32 [n], uint8 [n], float32 [n], float

Layout of one version (written into `datasets/_tmp/` and renamed into place whole; never changed after):

    tokens.parquet   one row per rollout: its steps' tokens ONCE, as flat lists (prefix included)
        rollout_id, group_id, task_id, status, stage, iteration, prefix_len, prefix_tokens,
        step_offsets   list<int64> [n_steps + 1]  step s owns token_ids[step_offsets[s]:step_offsets[s+1]];
                                                  a step no window uses (trailing observations, dropped
                                                  turns, the cut-off head of truncated observations) is empty
        step_assistant list<bool>  [n_steps]
        step_loss_start, step_loss_end  list<int32> [n_steps]  the ids the policy sampled in step s are its
                                                  tokens [start, end): the only ids a loss span trains
                                                  (consumers.sampled; format 1 had no such columns: whole steps)
        step_temperature list<float32> [n_steps]  the temperature step s was sampled at (1.0 unknown)
        token_ids      list<int32> [n_tokens]
        logprobs       list<float32> [n_tokens]   (rl) behaviour logprob per action token, null elsewhere
    samples.parquet  one row per window (sub-trajectory): numbers for SQL plus its spans
        (span_step, span_start, span_end, span_loss: tokens [start, end) of step `span_step`) into the
        rollout's tokens; input = prefix ++ spans, exactly `store.windows.materialize_flat`
    manifest.json    name, version, kind, format, event schema_version, config, tokenizer fingerprint,
                     input set (flush dirs + per-partition offset watermark),
                     counts, drops by reason, pending rollouts, table digests, content hash, created_at

So a dataset grows with unique tokens, not with the number of windows K. Content hash (`content_hash`):
sha256 over a canonical serialization of what the dataset says, never over file bytes, timestamps,
event ids or where the events sat in the archive: the header (format, kind, config, tokenizer
fingerprint, counts, drops, pending rollouts) as sorted-key JSON, then a digest of `tokens` (per rollout,
sorted by rollout_id) and of `samples` (sorted by rollout_id, window_idx), each column serialized as
little-endian values + lengths + null flags. A rebuild from the same events gives the same hash.

SQL views `datasets` (one row per version) and `samples` (one row per window of every version):
store.dataset_views.

With an archive in a bucket, versions are published there too, and a version only there is fetched into
`HOME/datasets/_cache/NAME/v<N>/` (store.datasets_s3); `versions`, `version_dir` and `all_manifests` find
cached versions beside local ones (a local one wins), and `load_manifest`/`open_version` with `archive`
fetch first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from store.windows import SplitResult, Window, materialize_flat
from core.procs import fsync_path
from schemas.errors import ConfigError, TerminalError

FORMAT = 2  # layout version of a dataset; part of the content hash (2: per-step sampled ranges, temperature)
DATASETS = "datasets"
TOKENS, SAMPLES, MANIFEST = "tokens.parquet", "samples.parquet", "manifest.json"
ROW_GROUP_TOKENS = 32 << 20  # tokens per row group of tokens.parquet: what a reader holds at once
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: `$` would pass "name\n"
_VERSION_DIR = re.compile(r"v(\d+)")

TOKENS_SCHEMA = pa.schema([
    ("rollout_id", pa.string()), ("group_id", pa.string()), ("task_id", pa.string()), ("status", pa.string()),
    ("stage", pa.int32()), ("iteration", pa.int32()), ("prefix_len", pa.int32()), ("prefix_tokens", pa.int64()),
    ("step_offsets", pa.list_(pa.int64())), ("step_assistant", pa.list_(pa.bool_())),
    ("step_loss_start", pa.list_(pa.int32())), ("step_loss_end", pa.list_(pa.int32())),
    ("step_temperature", pa.list_(pa.float32())),
    ("token_ids", pa.list_(pa.int32())), ("logprobs", pa.list_(pa.float32())),
])
SAMPLES_SCHEMA = pa.schema([
    ("rollout_id", pa.string()), ("group_id", pa.string()), ("task_id", pa.string()), ("stage", pa.int32()),
    ("iteration", pa.int32()), ("window_idx", pa.int32()), ("first_turn", pa.int32()), ("last_turn", pa.int32()),
    ("n_turns", pa.int32()), ("first_step", pa.int32()), ("last_step", pa.int32()), ("n_tokens", pa.int64()),
    ("n_loss_tokens", pa.int64()), ("obs_truncated", pa.bool_()), ("prefix_loss", pa.bool_()),
    ("q", pa.float64()), ("advantage", pa.float64()), ("policy_version", pa.int64()), ("staleness", pa.int64()),
    ("span_step", pa.list_(pa.int32())), ("span_start", pa.list_(pa.int32())), ("span_end", pa.list_(pa.int32())),
    ("span_loss", pa.list_(pa.bool_())),
    # the window gives span k (prefix: every prefix step) the context it was generated in (consumers.materialize)
    ("span_same_ctx", pa.list_(pa.bool_())), ("prefix_same_ctx", pa.bool_()),
])


class DatasetError(TerminalError):
    """A dataset version is missing, unreadable, or its files do not match its content hash."""


# ---- names and places ---------------------------------------------------------------------------


def datasets_dir(home: Path | str) -> Path:
    return Path(home) / DATASETS


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise ConfigError(f"dataset name {name!r} is not valid: use letters, digits, '.', '_' and '-' "
                          "(starting with a letter or digit)")
    return name


def cache_dir(home: Path | str) -> Path:
    """Where versions fetched from the archive's bucket are kept (store.datasets_s3); found beside local ones."""
    return datasets_dir(home) / "_cache"


def _versions_in(root: Path, name: str) -> set[int]:
    d = root / name
    if not d.is_dir():
        return set()
    return {int(m[1]) for p in d.iterdir() if (m := _VERSION_DIR.fullmatch(p.name)) and (p / MANIFEST).is_file()}


def versions(home: Path | str, name: str, cached: bool = True) -> list[int]:
    """NAME's versions in this home: built here, and (`cached`) fetched from the bucket into the cache."""
    have = _versions_in(datasets_dir(home), name)
    return sorted(have | _versions_in(cache_dir(home), name) if cached else have)


def parse_ref(home: Path | str, ref: str) -> tuple[str, int]:
    """"NAME@N" -> (NAME, N); a bare "NAME" means its latest version."""
    name, _, ver = ref.partition("@")
    check_name(name)
    have = versions(home, name)
    if not have:
        raise DatasetError(f"no dataset named {name!r} in {datasets_dir(home)} (see `klong dataset list`)")
    if not ver:
        return name, have[-1]
    if not ver.isdigit() or int(ver) not in have:
        raise DatasetError(f"{ref}: no such version of {name} (versions: {', '.join(map(str, have))})")
    return name, int(ver)


def version_dir(home: Path | str, name: str, version: int) -> Path:
    """The version's directory: built here, else its copy in the cache (a local version wins)."""
    local = datasets_dir(home) / name / f"v{version}"
    cached = cache_dir(home) / name / f"v{version}"
    return cached if not (local / MANIFEST).is_file() and (cached / MANIFEST).is_file() else local


def _fetched(home: Path | str, ref: str, archive) -> None:
    """With an archive in a bucket: checks `ref` against the bucket's copy, or fetches it into the cache."""
    from core.objstore import is_s3

    if archive is not None and is_s3(archive):
        from store.datasets_s3 import resolve

        resolve(home, archive, ref)


def load_manifest(home: Path | str, ref: str, archive=None) -> dict:
    """The manifest of `ref`; with `archive` in a bucket, a version only there is fetched first."""
    _fetched(home, ref, archive)
    name, ver = parse_ref(home, ref)
    path = version_dir(home, name, ver) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{name}@{ver}: manifest {path} is unreadable: {e}") from e


def all_manifests(home: Path | str, cached: bool = True) -> list[dict]:
    """Every version's manifest, by name and version (`cached`: with the versions fetched into the cache)."""
    roots = [datasets_dir(home), *([cache_dir(home)] if cached else [])]
    names = {d.name for root in roots if root.is_dir() for d in root.iterdir() if d.is_dir() and _NAME.fullmatch(d.name)}
    out = []
    for name in sorted(names):
        for v in versions(home, name, cached):
            try:
                out.append(json.loads((version_dir(home, name, v) / MANIFEST).read_text()))
            except (OSError, ValueError):
                continue  # an unreadable manifest shows up in `klong dataset show`, not in a listing
    return out


# ---- content hash -------------------------------------------------------------------------------


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


# ---- writing ------------------------------------------------------------------------------------

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


# ---- reading ------------------------------------------------------------------------------------


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
