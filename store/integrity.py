"""Archive integrity: find damaged flush directories, move them aside, and rebuild them from Kafka.

    klong archive verify            # every file read whole; rows checked against the directory's offsets
    klong archive repair            # quarantine what is bad, re-fetch its offsets from Kafka when still there
    >>> verify(settings.archive_dir)                  # [Problem(flush, what), ...]
    >>> repair(settings)                              # RepairReport(quarantined, refetched, lost)

A flush directory `<topic>+<partition>+<start>+<end>` is good when every Parquet file in it reads whole,
every row's (topic, partition, offset) lies in the directory's range, no offset appears twice, and the
first and last offsets of the range are there (the sink names a directory by the first and last record
it holds). A bad one is moved to `archive/_quarantine/` (same sub-path): it leaves every view, so
queries work again, `klong sql` and `klong status` say that something is quarantined, and nothing is
deleted. Repair then reads the same offsets of the same topic incarnation from Kafka and writes them
through the sink's own flush code (`consumers.flush`), so the rebuilt directory is what the sink would
have written. Offsets Kafka no longer holds (retention, a restarted memory broker) are reported as lost;
the quarantined copy stays for a person to look at.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from klong.settings import Settings
from schemas.errors import BrokerError
from store.archive import DEAD_LETTERS, QUARANTINE, FlushDir, list_flushes, writer_lock


@dataclass(frozen=True)
class Problem:
    flush: FlushDir
    what: str


@dataclass
class RepairReport:
    quarantined: list[Path] = field(default_factory=list)  # where each bad directory went
    refetched: list[Path] = field(default_factory=list)  # directories rebuilt from Kafka
    lost: list[str] = field(default_factory=list)  # ranges Kafka no longer holds, with why


def _offsets(path: Path, is_dead: bool):
    cols = ["topic", "partition", "offset"] if is_dead else ["kafka_topic", "kafka_partition", "kafka_offset"]
    table = pq.read_table(path)  # the whole file: a damaged page fails here, not in a user's query
    return table.num_rows, zip(*(table.column(c).to_pylist() for c in cols))


def check_flush(d: FlushDir) -> list[str]:
    """What is wrong with one flush directory (empty when it is good)."""
    problems, seen = [], Counter()
    files = sorted(p for p in d.path.iterdir() if p.suffix == ".parquet")
    if not files:
        return ["no Parquet file"]
    for f in files:
        try:
            _, rows = _offsets(f, f.stem == DEAD_LETTERS)
            for topic, partition, offset in rows:
                if topic != d.topic or partition != d.partition or not d.start <= offset <= d.end:
                    problems.append(f"{f.name}: a row of {topic}+{partition} offset {offset} is outside the directory")
                    break
                seen[offset] += 1
        except Exception as e:  # noqa: BLE001 - any reader error means this file cannot be trusted
            problems.append(f"{f.name}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if not problems:
        dup = [o for o, n in seen.items() if n > 1]
        if dup:
            problems.append(f"offset {dup[0]} archived {seen[dup[0]]} times")
        elif d.start not in seen or d.end not in seen:
            problems.append(f"rows for offsets {d.start}..{d.end} expected; first/last missing "
                            f"({len(seen)} rows, {min(seen, default='-')}..{max(seen, default='-')})")
    return problems


def verify(archive: Path) -> list[Problem]:
    return [Problem(d, what) for d in list_flushes(archive) for what in check_flush(d)]


def quarantined(archive: Path) -> list[Path]:
    """Flush directories moved aside by `repair` (kept until a person removes them)."""
    root = archive / QUARANTINE
    return sorted(p for p in root.glob("*/*/*") if p.is_dir()) if root.exists() else []


def quarantine(archive: Path, d: FlushDir) -> Path:
    dest = archive / QUARANTINE / d.topic / d.topic_id / d.path.name
    if dest.exists():  # quarantined before and rebuilt bad again: keep both
        dest = dest.with_name(f"{dest.name}.{time.strftime('%Y%m%dT%H%M%S')}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(archive, exclusive=True):
        os.rename(d.path, dest)
    return dest


def _refetch(settings: Settings, d: FlushDir, timeout_s: float) -> tuple[Path | None, str]:
    """Reads offsets start..end of the flush's partition from Kafka and writes them as the sink would."""
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    from consumers.flush import FlushJob, run_flush

    try:
        admin = KafkaAdminClient(**settings.kafka_config(), request_timeout_ms=10_000)
        consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, request_timeout_ms=10_000)
    except KafkaError as e:
        raise BrokerError(f"cannot reach Kafka at {settings.bootstrap()} to re-fetch: {e}") from e
    try:
        ids = {t["name"]: t["topic_id"] for t in admin.describe_topics([d.topic]) if t["error_code"] == 0}
        if ids.get(d.topic) != d.topic_id:
            return None, f"topic {d.topic} is now incarnation {ids.get(d.topic, 'none')}, not {d.topic_id}"
        tp = TopicPartition(d.topic, d.partition)
        consumer.assign([tp])
        first = consumer.beginning_offsets([tp])[tp]
        end = consumer.end_offsets([tp])[tp]
        if first > d.start or end <= d.end:
            return None, f"Kafka holds offsets {first}..{end - 1} of {d.topic}+{d.partition}, not all of {d.start}..{d.end}"
        consumer.seek(tp, d.start)
        records, deadline = [], time.monotonic() + timeout_s
        while (not records or records[-1].offset < d.end) and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                records += [r for r in recs if d.start <= r.offset <= d.end]
        if not records or records[-1].offset != d.end:
            return None, f"offsets {d.start}..{d.end} of {d.topic}+{d.partition} did not all arrive in {timeout_s:.0f} s"
        job = FlushJob.of(settings.archive_dir, settings.blob_dir, d.topic, d.topic_id, d.partition, records)
        return run_flush(job).path, ""
    finally:
        consumer.close()
        admin.close()


def repair(settings: Settings, *, refetch: bool = True, timeout_s: float = 60.0) -> RepairReport:
    """Quarantines every bad flush directory, then (with `refetch`) rebuilds each from Kafka."""
    report = RepairReport()
    for d in {p.flush.path: p.flush for p in verify(settings.archive_dir)}.values():
        report.quarantined.append(quarantine(settings.archive_dir, d))
        if not refetch:
            report.lost.append(f"{d.path.name}: not re-fetched (--no-refetch)")
            continue
        path, why = _refetch(settings, d, timeout_s)
        if path is not None and not check_flush(next(f for f in list_flushes(settings.archive_dir, d.topic)
                                                     if f.path == path)):
            report.refetched.append(path)
        else:
            report.lost.append(f"{d.path.name}: {why or 'the rebuilt directory is bad too'}")
    return report
