"""The event archive: Parquet files named by the Kafka offsets they hold (the Kafka Connect HDFS pattern).

Layout under the data home:

    archive/<topic>/<topic_id>/<topic>+<partition>+<first offset>+<last offset>/<event_type>.parquet
                                                                               /dead_letters.parquet

One directory per flush of one partition, written under `archive/_tmp/`, fsync'd and renamed into
place: a flush is in the archive whole or not at all. `klong archive repair` moves a damaged one to
`archive/_quarantine/` (store.integrity). The archive, not Kafka's committed offset, is
the truth: at start the sink resumes each partition after the highest last offset in the names.
`topic_id` is the topic's incarnation (a memory broker that restarts recreates its topics with new
ids and offsets from 0 again), so offsets of different incarnations never collide.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from klong.procs import fsync_path

TMP = "_tmp"
QUARANTINE = "_quarantine"  # damaged flush directories moved aside by `klong archive repair` (store.integrity)
DEAD_LETTERS = "dead_letters"
LOW_CARDINALITY = {"event_type", "producer_id", "rollout_id", "role", "kafka_topic", "task_id", "group_id", "status",
                   "priority", "split", "judge_model", "phase", "topic", "error_kind", "scaffold", "model"}
_NAME = re.compile(r"^(?P<topic>.+)\+(?P<partition>\d+)\+(?P<start>\d+)\+(?P<end>\d+)$")
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


def flush_name(topic: str, partition: int, start: int, end: int) -> str:
    return f"{topic}+{partition}+{start:020d}+{end:020d}"


def list_flushes(archive: Path, topic: str | None = None) -> list[FlushDir]:
    out = []
    if not archive.exists():
        return out
    for topic_dir in sorted(archive.iterdir()):
        if topic_dir.name in (TMP, QUARANTINE) or not topic_dir.is_dir() or (topic and topic_dir.name != topic):
            continue
        for id_dir in sorted(topic_dir.iterdir()):
            for d in sorted(id_dir.iterdir()):
                m = _NAME.match(d.name)
                if m and d.is_dir():
                    out.append(FlushDir(m["topic"], id_dir.name, int(m["partition"]), int(m["start"]), int(m["end"]), d))
    return out


def archived_files(archive: Path) -> dict[str, list[Path]]:
    """Every archived Parquet file by table name (an event type or dead_letters), in path order, from one
    walk of the layout. Walking instead of globbing: a writer's temp directory vanishing mid-walk cannot
    fail a reader."""
    files: dict[str, list[Path]] = {}
    for d in list_flushes(archive):
        for f in sorted(d.path.iterdir()):
            if f.suffix == ".parquet":
                files.setdefault(f.stem, []).append(f)
    return files


def recover_positions(archive: Path, topic: str, topic_id: str) -> dict[int, int]:
    """Next offset to read per partition of this topic incarnation: 1 + the highest archived last offset."""
    pos: dict[int, int] = {}
    id_dir = archive / topic / topic_id
    if not id_dir.exists():
        return pos
    for d in id_dir.iterdir():
        m = _NAME.match(d.name)
        if m:
            p = int(m["partition"])
            pos[p] = max(pos.get(p, 0), int(m["end"]) + 1)
    return pos


def write_flush(archive: Path, topic: str, topic_id: str, partition: int, start: int, end: int,
                tables: dict[str, pa.Table], compression: str = "zstd") -> Path:
    """Atomically adds one flush directory. Idempotent: an already archived range is left as it is."""
    final = archive / topic / topic_id / flush_name(topic, partition, start, end)
    if final.exists():
        return final
    tmp = archive / TMP / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for name, table in tables.items():
            path = tmp / f"{name}.parquet"
            # Dictionary-encode only low-cardinality columns: trying it on token arrays costs 2x the write.
            pq.write_table(table, path, compression=compression,
                           use_dictionary=[c for c in table.column_names if c in LOW_CARDINALITY])
            with open(path, "rb+") as f:
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
def writer_lock(archive: Path, exclusive: bool):
    """Writers hold it shared while they rename a flush into place; a sink takes it exclusive while it
    reads positions, so it never misses a rename still in progress by an orphaned writer of a killed sink."""
    archive.mkdir(parents=True, exist_ok=True)
    with open(archive / ".writers.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def clean_tmp(archive: Path, older_than_s: float = 3600) -> int:
    """Removes temp directories of dead local writers (and any older than an hour). Returns the count."""
    tmp_root = archive / TMP
    removed = 0
    if not tmp_root.exists():
        return 0
    host = socket.gethostname()
    for d in tmp_root.iterdir():
        h, _, rest = d.name.rpartition("-")[0].rpartition("-")
        stale = time.time() - d.stat().st_mtime > older_than_s
        dead_local = h == host and rest.isdigit() and not Path(f"/proc/{rest}").exists()
        if stale or dead_local:
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed
