"""Archive integrity: find damaged and missing flushes, move damaged ones aside, re-fetch both from Kafka.

    klong archive verify            # every file read whole and checked against its flush's manifest; gaps found
    klong archive repair            # quarantine what is damaged, re-fetch what is damaged or missing from Kafka
    >>> verify(settings.archive_dir)                  # [Problem(kind, path, what, flush, gap), ...]
    >>> repair(settings)                              # RepairReport(quarantined, refetched, lost, strays)

Three kinds of problem:

- **damaged**: a flush directory whose manifest (store.archive) is unreadable, or that lacks a file its
  manifest lists, or whose file differs from the manifest (size, CRC-32, row count), does not read
  whole, holds a row outside the directory's offsets, an offset twice, or fewer records than the
  manifest says. Flushes written before manifests are checked by their rows alone.
- **missing**: offsets no flush holds. Per topic partition (and incarnation) the flushes form a chain:
  each manifest names the last offset the sink had read before it (`after`), so a deleted flush in the
  middle or at the start shows as a break; past the last flush, the sink group's committed offset
  (when Kafka answers) says how far the archive must reach, so a deleted last flush shows too.
- **stray**: anything that is not part of the layout (a README, a symlink, a Parquet file no manifest
  lists). Every reader skips it with a warning and never follows it; it is reported, never a reason to
  hide good rows, and left where it is.

`repair` moves each damaged flush to `archive/_quarantine/` (same sub-path; nothing is deleted), then
reads the offsets of every damaged and missing range from the same topic incarnation in Kafka and writes
them through the sink's own flush code (`store.flush`), so a rebuilt directory is what the sink would
have written. Ranges Kafka no longer holds (retention, a restarted memory broker) are reported as lost.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from core.settings import Settings
from store.archive import DEAD_LETTERS, MANIFEST, QUARANTINE, FlushDir, Stray, walk, writer_lock
from core.objstore import S3Location, is_s3

Kind = Literal["damaged", "missing", "stray"]


@dataclass(frozen=True)
class Gap:
    """Offsets after+1..through of one topic partition incarnation (after None: from the partition's start)."""
    topic: str
    topic_id: str
    partition: int
    after: int | None
    through: int

    def __str__(self) -> str:
        first = "its start" if self.after is None else self.after + 1
        return f"{self.topic}+{self.partition} offsets {first}..{self.through}"


@dataclass(frozen=True)
class Problem:
    kind: Kind
    path: Path  # the flush directory, the stray entry, or the incarnation directory of a gap
    what: str
    flush: FlushDir | None = None
    gap: Gap | None = None


@dataclass
class RepairReport:
    quarantined: list[Path] = field(default_factory=list)  # where each damaged directory went
    refetched: list[Path] = field(default_factory=list)  # directories rebuilt from Kafka
    lost: list[str] = field(default_factory=list)  # ranges Kafka no longer holds, with why
    strays: list[Stray] = field(default_factory=list)  # reported and left alone


def _read(d: FlushDir, path: Path, meta: dict | None, problems: list[str]) -> pa.Table | None:
    try:
        data = d.read_bytes(path)
    except OSError as e:  # deleted since the walk, or the bucket is away
        problems.append(f"{path.name}: cannot be read ({str(e).splitlines()[0][:200]})")
        return None
    if meta is not None:
        if len(data) != meta.get("bytes"):
            problems.append(f"{path.name}: {len(data)} bytes, the manifest says {meta.get('bytes')}")
            return None
        if zlib.crc32(data) != meta.get("crc32"):
            problems.append(f"{path.name}: its CRC-32 differs from the manifest's (the file changed)")
            return None
    try:
        return pq.read_table(pa.BufferReader(data))  # the whole file: a damaged page fails here, not in a query
    except Exception as e:  # noqa: BLE001 - any reader error means this file cannot be trusted
        problems.append(f"{path.name}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return None


def check_flush(d: FlushDir) -> list[str]:
    """What is wrong with one flush directory (empty when it is good)."""
    if d.manifest_error:
        return [d.manifest_error]
    m, problems, seen = d.manifest, [], Counter()
    if m is not None:
        expect = {"topic": d.topic, "topic_id": d.topic_id, "partition": d.partition, "first": d.start, "last": d.end}
        wrong = [k for k, v in expect.items() if m.get(k) != v]
        if wrong:
            return [f"manifest.json names another flush ({', '.join(f'{k} {m.get(k)!r}' for k in wrong)})"]
        listed = {name[:-len(".parquet")]: meta for name, meta in m["files"].items()}
        problems += [f"{t}.parquet: missing (the manifest lists it)" for t in sorted(listed.keys() - d.files.keys())]
    else:
        listed = {t: None for t in d.files}
        if not listed:
            return ["no Parquet file"]
    for table in sorted(listed.keys() & d.files.keys()):
        t = _read(d, d.files[table], listed[table], problems)
        if t is None:
            continue
        if listed[table] is not None and t.num_rows != listed[table].get("rows"):
            problems.append(f"{table}.parquet: {t.num_rows} rows, the manifest says {listed[table].get('rows')}")
        cols = ["topic", "partition", "offset"] if table == DEAD_LETTERS else ["kafka_topic", "kafka_partition", "kafka_offset"]
        for topic, partition, offset in zip(*(t.column(c).to_pylist() for c in cols)):
            if topic != d.topic or partition != d.partition or not d.start <= offset <= d.end:
                problems.append(f"{table}.parquet: a row of {topic}+{partition} offset {offset} is outside the directory")
                break
            seen[offset] += 1
    if problems:
        return problems
    dup = [o for o, n in seen.items() if n > 1]
    if dup:
        return [f"offset {dup[0]} archived {seen[dup[0]]} times"]
    if d.start not in seen or d.end not in seen:
        return [f"rows for offsets {d.start}..{d.end} expected; first/last missing "
                f"({len(seen)} rows, {min(seen, default='-')}..{max(seen, default='-')})"]
    if m is not None and len(seen) != m.get("records"):
        return [f"{len(seen)} records, the manifest says {m.get('records')}"]
    return []


def chain_gaps(flushes: list[FlushDir], committed: dict[tuple[str, str, int], int] | None = None) -> list[Gap]:
    """The offset ranges no flush holds: breaks in each partition's chain of manifests, and the stretch
    between the last flush and the sink's `committed` offset ((topic, topic_id, partition) -> next offset)."""
    chains: dict[tuple[str, str, int], list[FlushDir]] = defaultdict(list)
    for d in flushes:
        chains[(d.topic, d.topic_id, d.partition)].append(d)
    gaps = []
    for key, ds in chains.items():
        prev: int | None = None  # the last offset accounted for so far
        for d in sorted(ds, key=lambda d: (d.start, d.end)):
            after = d.after
            if after is not None and (prev is None or after > prev):  # a flush without manifest: no `after`
                gaps.append(Gap(*key, prev, after))
            prev = d.through if prev is None else max(prev, d.through)
        end = (committed or {}).get(key)
        if end is not None and prev is not None and end - 1 > prev:
            gaps.append(Gap(*key, prev, end - 1))
    for key, end in (committed or {}).items():
        if key not in chains and end > 0:
            gaps.append(Gap(*key, None, end - 1))
    return gaps


def verify(archive: Path | S3Location, committed: dict[tuple[str, str, int], int] | None = None) -> list[Problem]:
    """Every problem of the archive: damaged flushes, missing ranges, strays (see the module docstring)."""
    flushes, strays = walk(archive)
    out = [Problem("damaged", d.path, what, flush=d) for d in flushes for what in check_flush(d)]
    where = (lambda g: PurePosixPath(archive.join(g.topic, g.topic_id))) if is_s3(archive) else (lambda g: archive / g.topic / g.topic_id)
    out += [Problem("missing", where(g), f"{g} are in no flush", gap=g)
            for g in chain_gaps(flushes, committed)]
    out += [Problem("stray", s.path, s.why) for s in strays]
    return out


def quarantined(archive: Path | S3Location) -> list[Path]:
    """Flush directories moved aside by `repair` (kept until a person removes them)."""
    if is_s3(archive):
        return sorted({PurePosixPath(i.path).parent for i in archive.list(archive.join(QUARANTINE))})
    root = archive / QUARANTINE
    return sorted(p for p in root.glob("*/*/*") if p.is_dir()) if root.exists() else []


def quarantine(archive: Path | S3Location, d: FlushDir) -> Path:
    if is_s3(archive):
        return _quarantine_s3(archive, d)
    dest = archive / QUARANTINE / d.topic / d.topic_id / d.path.name
    if dest.exists():  # quarantined before and rebuilt bad again: keep both
        dest = dest.with_name(f"{dest.name}.{time.strftime('%Y%m%dT%H%M%S')}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(archive, exclusive=True):
        os.rename(d.path, dest)
    return dest


def _quarantine_s3(loc: S3Location, d: FlushDir) -> PurePosixPath:
    """Moves a flush's objects under `_quarantine/`: its manifest goes first (from then on it is not
    archived), copied, then deleted; then every other object of it."""
    dest = loc.join(QUARANTINE, d.topic, d.topic_id, d.path.name)
    if loc.list(dest):
        dest += f".{time.strftime('%Y%m%dT%H%M%S')}"
    objects = [i.path for i in loc.list(str(d.path))]
    with writer_lock(loc, exclusive=True):
        for src in sorted(objects, key=lambda p: not p.endswith("/" + MANIFEST)):
            loc.fs.copy_file(src, f"{dest}/{src.rsplit('/', 1)[1]}")
            loc.delete(src)
    return PurePosixPath(dest)


def _damaged_range(d: FlushDir, flushes: list[FlushDir]) -> Gap:
    """The offsets a damaged flush accounted for. Without a usable manifest: from the flush before it."""
    after = d.after
    if d.manifest is None:
        before = [f.through for f in flushes if (f.topic, f.topic_id, f.partition) == (d.topic, d.topic_id, d.partition)
                  and f.end < d.start]
        after = max(before, default=None)
    return Gap(d.topic, d.topic_id, d.partition, after, d.through)


def committed_offsets(kafka) -> dict[tuple[str, str, int], int]:
    """The sink group's committed offsets, keyed by the topic's current incarnation."""
    ids = kafka.topic_ids()
    return {(t, ids[t], p): off for (t, p), off in kafka.committed().items() if t in ids}


def repair(settings: Settings, *, refetch: bool = True, timeout_s: float = 60.0) -> RepairReport:
    """Quarantines every damaged flush directory, then (with `refetch`) re-fetches every damaged and missing
    range from Kafka. Without `refetch` nothing asks Kafka, so a deleted last flush is not seen."""
    from store.refetch import KafkaSide

    archive = settings.archive
    with KafkaSide(settings) if refetch else contextlib.nullcontext() as kafka:
        problems = verify(archive, committed_offsets(kafka) if kafka else None)
        damaged = list({p.flush.path: p.flush for p in problems if p.kind == "damaged"}.values())
        report = RepairReport(strays=[Stray(p.path, p.what) for p in problems if p.kind == "stray"])
        flushes = walk(archive)[0]
        ranges = [p.gap for p in problems if p.kind == "missing"] + [_damaged_range(d, flushes) for d in damaged]
        report.quarantined = [quarantine(archive, d) for d in damaged]
        for gap in sorted(ranges, key=lambda g: (g.topic, g.topic_id, g.partition, g.through)):
            path, why = _refetch(settings, kafka, gap, timeout_s) if kafka else (None, "not re-fetched (--no-refetch)")
            if path is not None:
                report.refetched.append(path)
            else:
                report.lost.append(f"{gap}: {why}")
    return report


def _refetch(settings: Settings, kafka, gap: Gap, timeout_s: float) -> tuple[Path | None, str]:
    """Reads one range from Kafka and writes it as the sink would; (path, "") or (None, why not)."""
    from store.flush import FlushJob, run_flush
    from store.archive import list_flushes
    from store.refetch import Unavailable

    current = kafka.topic_ids().get(gap.topic)
    if current != gap.topic_id:
        return None, f"topic {gap.topic} is now incarnation {current or 'none'}, not {gap.topic_id}"
    try:
        records = kafka.fetch(gap.topic, gap.partition, gap.after, gap.through, timeout_s)
    except Unavailable as e:
        return None, str(e)
    if not records:
        return None, "Kafka holds no records in this range (nothing to archive)"
    job = FlushJob.of(settings.archive, settings.blob_dir, gap.topic, gap.topic_id, gap.partition, records,
                      after=gap.after, through=gap.through)
    path = run_flush(job).path
    rebuilt = next(f for f in list_flushes(settings.archive, gap.topic) if f.path == path)
    bad = check_flush(rebuilt)
    return (path, "") if not bad else (None, f"the rebuilt {path.name} is bad too: {bad[0]}")
