"""The archive's layout: its names, the flush directory record, and the flush manifest (its format and checks).

    flush_name("t.rollouts", 0, 10, 19)          # "t.rollouts+0+000...10+000...19"
    read_manifest(flush_path)                    # the parsed manifest.json; None without one, ValueError if unusable

The layout itself is described in store.archive. A manifest comes from disk (or a bucket), so it is
untrusted: every field a reader uses is type-checked before the flush is read (else it is damaged).
"""

from __future__ import annotations

import json
import os
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from core.objstore import S3Location
from schemas.arrow import SCHEMAS

TMP = "_tmp"
QUARANTINE = "_quarantine"  # damaged flush directories moved aside by `klong archive repair` (store.integrity)
DATASETS = "_datasets"  # in a bucket archive: published dataset versions (store.datasets_s3), not flushes
LOCK = ".writers.lock"
DEAD_LETTERS = "dead_letters"
MANIFEST = "manifest.json"
TABLES = frozenset([*SCHEMAS, DEAD_LETTERS])  # the table names a flush directory can hold
LOW_CARDINALITY = {"event_type", "producer_id", "rollout_id", "role", "kafka_topic", "task_id", "group_id", "status",
                   "priority", "split", "judge_model", "phase", "topic", "error_kind", "scaffold", "model"}
_NAME = re.compile(r"(?P<topic>.+)\+(?P<partition>\d+)\+(?P<start>\d+)\+(?P<end>\d+)")
DEAD_LETTER_SCHEMA = pa.schema([
    pa.field("topic", pa.string(), nullable=False),
    pa.field("partition", pa.int32(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("key", pa.binary()),
    pa.field("raw", pa.binary()),  # the message bytes exactly as received
    pa.field("error", pa.string(), nullable=False),
    pa.field("error_kind", pa.string(), nullable=False),  # json | schema | payload | claim_check | empty
    pa.field("sunk_at", pa.timestamp("us", tz="UTC"), nullable=False),
])


@dataclass(frozen=True)
class FlushDir:
    topic: str
    topic_id: str
    partition: int
    start: int  # first offset held
    end: int  # last offset held (inclusive)
    path: Path
    # The parsed manifest.json; None for a flush written before manifests (or one whose manifest is unreadable).
    manifest: dict | None = field(default=None, compare=False, hash=False, repr=False)
    # table name -> file, the files a reader reads: what the manifest lists and is there as a regular file.
    files: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    manifest_error: str | None = field(default=None, compare=False, hash=False)  # why manifest.json is unusable
    store: S3Location | None = field(default=None, compare=False, hash=False, repr=False)  # None: local disk

    def read_bytes(self, file) -> bytes:
        """One of this flush's files, whole (`path` and `files` are `bucket/key` paths on S3)."""
        return self.store.read_bytes(str(file)) if self.store else Path(file).read_bytes()

    @property
    def after(self) -> int | None:
        """The last offset the sink had read before this flush (None: it read the partition from its start,
        or the flush has no manifest)."""
        return self.manifest.get("after") if self.manifest else None

    @property
    def through(self) -> int:
        """The last offset this flush accounts for (its last record, or a later offset a re-fetch covered)."""
        return max(self.end, (self.manifest or {}).get("through", self.end))


@dataclass(frozen=True)
class Stray:
    """Something in the archive that is not part of its layout: skipped by every reader."""
    path: Path
    why: str


def flush_name(topic: str, partition: int, start: int, end: int) -> str:
    return f"{topic}+{partition}+{start:020d}+{end:020d}"


_manifests: dict[tuple, dict] = {}  # (path, inode, mtime, size) -> parsed manifest: a walk per query stays cheap


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63


def _well_formed(m) -> bool:
    """The manifest is from disk, so untrusted: every field a reader uses has its type (else the flush is damaged)."""
    return (isinstance(m, dict) and isinstance(m.get("files"), dict)
            and all(_is_int(m.get(k)) for k in ("partition", "first", "last", "through", "records"))
            and (m.get("after") is None or _is_int(m.get("after")))
            and all(isinstance(n, str) and n.endswith(".parquet") and "/" not in n and isinstance(f, dict) and _is_int(f.get("rows")) and _is_int(f.get("bytes"))
                    and _is_int(f.get("crc32")) for n, f in m["files"].items()))


def read_manifest(path: Path) -> dict | None:
    """The manifest of a flush directory: None when it has none; ValueError when it is there but unusable."""
    f = path / MANIFEST
    try:
        st = os.lstat(f)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{MANIFEST} is not a regular file (a symlink is never followed)")
    key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)  # a rewritten manifest is read again
    if key not in _manifests:
        _manifests[key] = parse_manifest(f.read_bytes)
    return _manifests[key]


def parse_manifest(read) -> dict:
    """The manifest `read()` returns, checked; ValueError when it is unusable."""
    try:
        manifest = json.loads(read())
    except (OSError, ValueError) as e:
        raise ValueError(f"{MANIFEST} is unreadable ({type(e).__name__}: {str(e)[:200]})") from e
    if not _well_formed(manifest):
        raise ValueError(f"{MANIFEST} is not a flush manifest (fields missing or of the wrong type)")
    return manifest


def file_entry(rows: int, data: bytes) -> dict:
    """A manifest's entry for one file: what verify checks it against."""
    return {"rows": rows, "bytes": len(data), "crc32": zlib.crc32(data)}


def make_manifest(topic: str, topic_id: str, partition: int, start: int, end: int, tables: dict[str, pa.Table],
                  files: dict, after: int | None, through: int | None, records: int | None) -> dict:
    """The manifest of one flush (one format for local disk and S3; `write_flush` says what the fields mean)."""
    return {"format": 1, "topic": topic, "topic_id": topic_id, "partition": partition, "first": start, "last": end,
            "after": after, "through": max(end, through if through is not None else end),
            "records": records if records is not None else sum(t.num_rows for t in tables.values()), "files": files}
