"""One flush of one partition: raw Kafka records -> validated Arrow tables -> an archive directory.

Runs in the sink's worker process (`consumers.sink`), so decoding and Parquet encoding use a second
core while the sink's main process keeps consuming (kafka-python's record parsing is pure Python and
holds the GIL). Pure function of its input: the same records always give the same directory.

No poison pills: any exception while decoding, validating, resolving the claim check of or converting
one message makes that message a dead letter with its error (`error_kind` says which stage); the other
messages of the flush are archived. A conversion failure of a whole event type's batch is retried
event by event to find the ones at fault.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from core.procs import pid_alive
from schemas.arrow import to_table
from schemas.errors import TransientError, ValidationError
from schemas.events import decode, event_type
from store.archive import DEAD_LETTER_SCHEMA, DEAD_LETTERS, write_flush, writer_lock


@dataclass(frozen=True)
class FlushJob:
    archive: Path
    blob_dir: Path
    topic: str
    topic_id: str
    partition: int
    offsets: list[int]  # ascending
    keys: list[bytes | None]
    # The message values concatenated (one memcpy to build, one to pickle: ~3x cheaper across the process
    # boundary than a list of bytes); value i is blob[bounds[i]:bounds[i + 1]]. A null value is empty.
    blob: bytes
    bounds: list[int]
    owner_pid: int  # the sink process that consumed these records
    after: int | None = None  # the last offset read before these records (None: the partition's start)
    through: int | None = None  # the last offset these records account for (None: the last record's)

    @classmethod
    def of(cls, archive: Path, blob_dir: Path, topic: str, topic_id: str, partition: int, records, *,
           after: int | None = None, through: int | None = None) -> "FlushJob":
        values = [r.value or b"" for r in records]
        bounds = list(itertools.accumulate(map(len, values), initial=0))
        return cls(archive, blob_dir, topic, topic_id, partition, [r.offset for r in records],
                   [r.key for r in records], b"".join(values), bounds, os.getpid(), after, through)

    def values(self) -> list[memoryview]:
        view = memoryview(self.blob)
        b = self.bounds
        return [view[b[i]:b[i + 1]] for i in range(len(self.offsets))]


@dataclass
class FlushResult:
    path: Path
    by_type: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0


def worker_init(parent_pid: int) -> None:
    """Initializer of the sink's worker process: exit as soon as the sink that spawned it is gone
    (a `kill -9`ed sink must not leave workers behind)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="klong-parent-watch", daemon=True).start()


class OrphanedFlush(TransientError):
    """The sink that asked for this flush is gone; a new sink re-reads these offsets itself."""


def run_flush(job: FlushJob) -> FlushResult:
    tables, by_type, n_dead = build_tables(job)
    with writer_lock(job.archive, exclusive=False):
        # A killed sink's worker may still hold queued jobs: writing them now could race the sink that
        # replaced it (which resumes from the archive). The lock makes check + rename atomic for it.
        if not pid_alive(job.owner_pid):
            raise OrphanedFlush(f"sink {job.owner_pid} is gone: flush of {job.topic}+{job.partition} dropped")
        path = write_flush(job.archive, job.topic, job.topic_id, job.partition, job.offsets[0], job.offsets[-1], tables,
                           after=job.after, through=job.through, records=len(job.offsets))
    return FlushResult(path, by_type, n_dead)


def build_tables(job: FlushJob) -> tuple[dict[str, pa.Table], dict[str, int], int]:
    by_type: dict[str, list] = defaultdict(list)
    dead: list[tuple[int, str, str]] = []  # (index into the job, error, kind)
    blobs = None
    values = job.values()
    for i, value in enumerate(values):
        try:
            if not value:
                raise ValidationError("empty message")
            ev = decode(value)
            if getattr(ev.payload, "blob_ref", None):
                from schemas.claimcheck import BlobStore, resolve_claim

                blobs = blobs or BlobStore(job.blob_dir)
                ev = resolve_claim(ev, blobs)
        except ValidationError as e:
            dead.append((i, str(e), error_kind(e)))
            continue
        except Exception as e:  # anything else one message can cause (RecursionError, OverflowError...)
            dead.append((i, f"{type(e).__name__}: {e}"[:2000], "decode"))
            continue
        by_type[event_type(ev)].append((ev, job.topic, job.partition, job.offsets[i]))
    tables, counts = {}, {}
    index_of = {o: i for i, o in enumerate(job.offsets)}
    for etype, items in by_type.items():
        table, bad = _to_table_isolated(etype, items)
        dead += [(index_of[items[j][3]], err, "payload") for j, err in bad]
        if table.num_rows:
            tables[etype] = table
            counts[etype] = table.num_rows
    if dead:
        now = dt.datetime.now(dt.timezone.utc)
        tables[DEAD_LETTERS] = pa.Table.from_pylist(
            [{"topic": job.topic, "partition": job.partition, "offset": job.offsets[i], "key": job.keys[i],
              "raw": bytes(values[i]), "error": err, "error_kind": kind, "sunk_at": now} for i, err, kind in sorted(dead)],
            schema=DEAD_LETTER_SCHEMA)
    return tables, counts, len(dead)


def _to_table_isolated(etype: str, items: list) -> tuple[pa.Table, list[tuple[int, str]]]:
    """`to_table`, but an exception converting the batch is narrowed down to the events causing it:
    each is converted alone, the failing ones are returned as errors, the rest concatenated."""
    try:
        return to_table(etype, items)
    except Exception:  # noqa: BLE001 - one bad event must not block its batch; the error is kept per event
        pass
    tables, bad = [], []
    for j, item in enumerate(items):
        try:
            table, errs = to_table(etype, [item])
        except Exception as e:  # noqa: BLE001
            bad.append((j, f"{type(e).__name__}: {e}"[:2000]))
            continue
        bad += [(j, err) for _, err in errs]
        if table.num_rows:
            tables.append(table)
    return (pa.concat_tables(tables) if tables else to_table(etype, [])[0]), bad


def error_kind(e: ValidationError) -> str:
    text = str(e)
    if text == "empty message":
        return "empty"
    if text.startswith(("not a JSON event", "not valid UTF-8")):
        return "json"
    if "blob" in text or "claim" in text:
        return "claim_check"
    return "schema"
