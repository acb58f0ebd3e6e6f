"""The event archive: Parquet files named by the Kafka offsets they hold (the Kafka Connect HDFS pattern).

Layout under the data home:

    archive/<topic>/<topic_id>/<topic>+<partition>+<first offset>+<last offset>/<event_type>.parquet
                                                                               /dead_letters.parquet
                                                                               /manifest.json

One directory per flush of one partition, written under `archive/_tmp/`, fsync'd and renamed into
place: a flush is in the archive whole or not at all. Its `manifest.json` is the commit record: the
files of the flush with their row counts, sizes and CRC-32, how many Kafka records it holds, and the
offset it follows (`after`: the last offset the sink had read before this flush; null when the sink read
the partition from its beginning), so a lost file or a lost flush shows as a broken chain
(store.integrity). `klong archive repair` moves a damaged flush to `archive/_quarantine/`. The archive,
not Kafka's committed offset, is the truth: at start the sink resumes each partition after the highest
last offset in the names. `topic_id` is the topic's incarnation (a memory broker that restarts recreates
its topics with new ids and offsets from 0 again), so offsets of different incarnations never collide.

Readers see only what the layout and the manifests name: anything else (a stray file, a symlink, a
Parquet file a manifest does not list) is skipped with one warning per path and never followed, so a
`README.txt` or a symlink to /etc dropped into the archive cannot fail or redirect a query. Flushes
written before manifests existed are read by their `<event_type>.parquet` files.

The archive can also be an S3 prefix (`KLONG_ARCHIVE_URL`, core.objstore): the same keys, and the
manifest object, written last, is the commit point there (store.archive_s3); these functions dispatch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
import uuid
import zlib
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.procs import fsync_path
from schemas.arrow import SCHEMAS
from core.objstore import S3Location, is_s3

log = logging.getLogger("klong.archive")
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


_warned: set[tuple[str, str]] = set()


def _warn(path: Path, why: str) -> None:
    if (str(path), why) not in _warned:  # readers run often (a viewer polls): once per process is enough
        _warned.add((str(path), why))
        log.warning("archive: ignoring %s: %s (`klong archive verify` lists what is out of place)", path, why)


def _entries(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _dirs(path: Path, strays: list[Stray], allowed_files: tuple[str, ...] = ()) -> list[os.DirEntry]:
    """The real sub-directories of `path`, sorted; every other entry (file, symlink) is a stray."""
    out = []
    try:
        entries = _entries(path)
    except OSError as e:
        strays.append(Stray(path, f"cannot be listed ({e.strerror})"))
        return out
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            out.append(e)
        elif not (e.name in allowed_files and e.is_file(follow_symlinks=False)):
            strays.append(Stray(Path(e.path), "a symlink (never followed)" if e.is_symlink() else "not a directory"))
    return out


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


def _flush_files(path: Path, manifest: dict | None, strays: list[Stray]) -> dict[str, Path]:
    """table -> file of one flush directory: the manifest's files (legacy: `<table>.parquet`) that are
    regular files; a listed file that is absent is left out (verify reports it), the rest are strays."""
    listed = set(manifest["files"]) if manifest is not None else None
    files = {}
    try:
        entries = _entries(path)
    except OSError:  # moved to quarantine by a repair while we walked: no longer in the archive
        return files
    for e in entries:
        name = e.name
        if name == MANIFEST:
            continue
        is_table = name.endswith(".parquet") and (name in listed if listed is not None else name[:-8] in TABLES)
        if not is_table:
            strays.append(Stray(Path(e.path), "not listed in the flush's manifest" if listed is not None
                                else "not an archive table file"))
        elif not e.is_file(follow_symlinks=False):
            strays.append(Stray(Path(e.path), "a symlink (never followed)" if e.is_symlink() else "not a regular file"))
        else:
            files[name[:-8]] = Path(e.path)
    return files


def walk(archive: Path | S3Location, topic: str | None = None, skip: Container[str] = frozenset()
         ) -> tuple[list[FlushDir], list[Stray]]:
    """Every flush directory (by topic, incarnation, name) and every stray entry, never following a symlink.
    `skip`: flush directory paths (as str) to leave out without reading their manifests (a reader that keeps
    what it read, so each walk costs only what is new)."""
    if is_s3(archive):
        from store.archive_s3 import walk_s3

        return walk_s3(archive, topic, skip)
    flushes: list[FlushDir] = []
    strays: list[Stray] = []
    if not archive.is_dir():
        return flushes, strays
    for topic_dir in _dirs(archive, strays, allowed_files=(LOCK,)):
        if topic_dir.name in (TMP, QUARANTINE) or (topic and topic_dir.name != topic):
            continue
        for id_dir in _dirs(Path(topic_dir.path), strays):
            for d in _dirs(Path(id_dir.path), strays):
                m = _NAME.fullmatch(d.name)
                path = Path(d.path)
                if not m or m["topic"] != topic_dir.name:
                    strays.append(Stray(path, "not a flush directory name (<topic>+<partition>+<first>+<last>)"))
                    continue
                if skip and str(path) in skip:
                    continue
                manifest, error = None, None
                try:
                    manifest = read_manifest(path)
                except ValueError as e:  # read like a flush without one; verify reports the flush as damaged
                    error = str(e)
                    _warn(path, error)
                flushes.append(FlushDir(m["topic"], id_dir.name, int(m["partition"]), int(m["start"]), int(m["end"]),
                                        path, manifest, _flush_files(path, manifest, strays), error))
    return flushes, strays


def list_flushes(archive: Path | S3Location, topic: str | None = None, skip: Container[str] = frozenset()
                 ) -> list[FlushDir]:
    """Every flush directory (but those in `skip`, see `walk`); stray entries are skipped with a warning
    (`walk` returns them)."""
    flushes, strays = walk(archive, topic, skip)
    for s in strays:
        _warn(s.path, s.why)
    return flushes


def relative(archive: Path | S3Location, path) -> str:
    """A flush's (or file's) path inside the archive, `topic/topic_id/flush`: the same string for a local
    directory and a bucket, so dataset manifests name their inputs the same way on both."""
    if is_s3(archive):
        text = str(path)
        if not archive.within(text) or text == archive.root:
            raise ValueError(f"{text} is not inside the archive {archive}")
        return text[len(archive.root) + 1:]
    return str(Path(path).relative_to(archive))


def archived_files(archive: Path | S3Location) -> dict[str, list[Path]]:
    """Every archived Parquet file by table name (an event type or dead_letters), in path order, from one
    walk of the layout. Walking instead of globbing: a writer's temp directory vanishing mid-walk cannot
    fail a reader, and nothing outside the layout is read."""
    files: dict[str, list[Path]] = {}
    for d in list_flushes(archive):
        for table, f in sorted(d.files.items()):
            files.setdefault(table, []).append(f)
    return files


def recover_positions(archive: Path | S3Location, topic: str, topic_id: str) -> dict[int, int]:
    """Next offset to read per partition of this topic incarnation: 1 + the highest archived last offset."""
    if is_s3(archive):
        from store.archive_s3 import recover_positions_s3

        return recover_positions_s3(archive, topic, topic_id)
    pos: dict[int, int] = {}
    id_dir = archive / topic / topic_id
    if not id_dir.is_dir() or id_dir.is_symlink():
        return pos
    for d in os.scandir(id_dir):
        m = _NAME.fullmatch(d.name)
        if m and d.is_dir(follow_symlinks=False):
            p = int(m["partition"])
            pos[p] = max(pos.get(p, 0), int(m["end"]) + 1)
    return pos


def file_entry(rows: int, data: bytes) -> dict:
    """A manifest's entry for one file: what verify checks it against."""
    return {"rows": rows, "bytes": len(data), "crc32": zlib.crc32(data)}


def make_manifest(topic: str, topic_id: str, partition: int, start: int, end: int, tables: dict[str, pa.Table],
                  files: dict, after: int | None, through: int | None, records: int | None) -> dict:
    """The manifest of one flush (one format for local disk and S3; `write_flush` says what the fields mean)."""
    return {"format": 1, "topic": topic, "topic_id": topic_id, "partition": partition, "first": start, "last": end,
            "after": after, "through": max(end, through if through is not None else end),
            "records": records if records is not None else sum(t.num_rows for t in tables.values()), "files": files}


def write_flush(archive: Path, topic: str, topic_id: str, partition: int, start: int, end: int,
                tables: dict[str, pa.Table], compression: str = "zstd", *, after: int | None = None,
                through: int | None = None, records: int | None = None) -> Path:
    """Atomically adds one flush directory, its manifest written last. Idempotent: an already archived
    range is left as it is. `after`: the last offset read before `start` (None: the partition's start;
    default start - 1); `through`: the last offset it accounts for (default `end`); `records`: the Kafka
    records it holds (default: the tables' rows)."""
    if is_s3(archive):
        from store.archive_s3 import write_flush_s3

        return write_flush_s3(archive, topic, topic_id, partition, start, end, tables, compression, after=after,
                              through=through, records=records)
    final = archive / topic / topic_id / flush_name(topic, partition, start, end)
    if final.exists():
        return final
    tmp = archive / TMP / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        files = {}
        for name, table in tables.items():
            path = tmp / f"{name}.parquet"
            # Dictionary-encode only low-cardinality columns: trying it on token arrays costs 2x the write.
            pq.write_table(table, path, compression=compression,
                           use_dictionary=[c for c in table.column_names if c in LOW_CARDINALITY])
            with open(path, "rb+") as f:
                # CRC-32 of the bytes just written (from the page cache): it finds damage at ~1.6 GB/s, where
                # SHA-256 measured 3.4x slower on the writer's critical path.
                data = f.read()
                os.fsync(f.fileno())
            files[path.name] = file_entry(table.num_rows, data)
        manifest = make_manifest(topic, topic_id, partition, start, end, tables, files, after, through, records)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
        fsync_path(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def writer_lock(archive: Path | S3Location, exclusive: bool):
    """Writers hold it shared while they rename a flush into place; a sink takes it exclusive while it
    reads positions, so it never misses a rename still in progress by an orphaned writer of a killed sink.
    For a bucket the lock is a local file (the sink and its writers share a machine)."""
    if is_s3(archive):
        from store.archive_s3 import lock_file

        lock = lock_file(archive)
    else:
        archive.mkdir(parents=True, exist_ok=True)
        lock = archive / LOCK
    with open(lock, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def clean_tmp(archive: Path, older_than_s: float = 3600) -> int:
    """Removes temp directories of dead local writers (and any older than an hour). Returns the count."""
    if is_s3(archive):
        return 0  # nothing goes to a temp place on S3; the sink drops unfinished flushes (store.archive_s3)
    tmp_root = archive / TMP
    removed = 0
    if not tmp_root.exists():
        return 0
    host = socket.gethostname()
    for d in tmp_root.iterdir():
        h, _, rest = d.name.rpartition("-")[0].rpartition("-")
        stale = time.time() - d.lstat().st_mtime > older_than_s
        dead_local = h == host and rest.isdigit() and not Path(f"/proc/{rest}").exists()
        if stale or dead_local:
            if d.is_symlink() or not d.is_dir():
                d.unlink(missing_ok=True)
            else:
                shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed
