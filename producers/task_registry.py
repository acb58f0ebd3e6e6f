"""What is registered: the task events this home can see, from the archive, Kafka and its registry file.

    registered_tasks(settings)["fre"].splits            # frozenset({"train"}): every version of task fre
    latest_task(settings, "fre")                         # (TaskPayload, number of versions, archived?) or None
    read_task_events(settings)                           # the tasks topic, start to end (not archived yet too)

What is registered is the union of (1) the archive (`task_registered_events`), (2) the tasks topic in
Kafka (events not archived yet; an unreachable broker logs a warning and is skipped by
`registered_tasks(kafka=True)`) and (3) this home's registry file `HOME/tasks/registry.jsonl` (one line
per event this home put into its outbox, appended and fsynced right after the put by `append_registry`:
it covers the time before Kafka has the event; a line torn by a crash is skipped). `read_topic` reads a
whole topic without a consumer group, skipping events that do not decode (the sink dead-letters them).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.settings import Settings
from producers.task_source import normalize_title
from schemas.errors import BrokerError, ValidationError
from schemas.events import Envelope, TaskPayload, TaskRegistered, decode

log = logging.getLogger("klong.tasks")


@dataclass(frozen=True)
class Registered:
    """What is already registered under one task id (all versions)."""

    task_id: str
    splits: frozenset
    titles: frozenset  # normalized
    latest_hash: str
    hashes: frozenset


def registry_file(settings: Settings) -> Path:
    return settings.home / "tasks" / "registry.jsonl"


def read_registry(settings: Settings) -> list[dict]:
    """This home's registry lines (task_id, title, split, content_hash, t, event_id)."""
    path = registry_file(settings)
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash: its event is in the spool and shows up in Kafka
    return rows


def append_registry(settings: Settings, ev: TaskRegistered) -> None:
    """One registry line for `ev`, fsynced (written right after the event is put into the outbox)."""
    path = registry_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = ev.payload
    line = json.dumps({"task_id": p.task_id, "title": p.title, "split": p.split, "content_hash": p.content_hash,
                       "t": ev.produced_at.timestamp(), "event_id": ev.event_id}) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_topic(settings: Settings, topic: str, timeout_s: float = 10.0) -> list[Envelope]:
    """Every valid event of a topic, read from its start to its end (no consumer group)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, group_id=None,
                                 request_timeout_ms=5000, fetch_max_wait_ms=50)
    except KafkaError as e:
        raise BrokerError(f"cannot reach Kafka at {settings.bootstrap()}: {e}") from e
    out: list[Envelope] = []
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or set())]
        if not tps:
            return out
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topic} did not finish within {timeout_s}s")
            for records in consumer.poll(timeout_ms=100).values():
                for r in records:
                    try:
                        out.append(decode(r.value or b""))
                    except ValidationError:
                        continue  # the sink dead-letters it
        return out
    except KafkaError as e:
        raise BrokerError(f"reading {topic} failed: {e}") from e
    finally:
        consumer.close()


def read_task_events(settings: Settings, timeout_s: float = 10.0) -> list[TaskRegistered]:
    """Every task event in the tasks topic (registered, maybe not archived yet)."""
    return [ev for ev in read_topic(settings, settings.topics.tasks, timeout_s) if isinstance(ev, TaskRegistered)]


# The archive's task events with every payload field, for `payload_from_row`.
ARCHIVED_TASKS_SQL = """
    SELECT task_id, title, split, paper_md, paper_ref, addendum, judge_addendum, rubric, blacklist, content_hash,
           epoch(produced_at) AS t FROM task_registered_events"""


def payload_from_row(row: dict) -> TaskPayload:
    """A row of ARCHIVED_TASKS_SQL -> the TaskPayload it was archived from (the rubric is JSON text there)."""
    fields = {k: row[k] for k in TaskPayload.__struct_fields__ if k in row}
    return TaskPayload(**{**fields, "rubric": json.loads(row["rubric"]) if row["rubric"] else None,
                          "blacklist": row["blacklist"] or []})


def latest_task(settings: Settings, task_id: str) -> Optional[tuple[TaskPayload, int, bool]]:
    """(latest TaskPayload, number of versions, archived?) of a registered task, None if it is unknown: from
    the archive, else from the tasks topic (registered a moment ago, not archived yet). Raises BrokerError
    when the task is not archived and Kafka is unreachable."""
    from store.catalog import Catalog, sql_str

    rows = Catalog(settings).arrow(
        f"SELECT * FROM ({ARCHIVED_TASKS_SQL}) WHERE task_id = {sql_str(task_id)} ORDER BY t").to_pylist()
    if rows:
        return payload_from_row(rows[-1]), len({r["content_hash"] for r in rows}), True
    evs = sorted((e for e in read_task_events(settings) if e.payload.task_id == task_id), key=lambda e: e.produced_at)
    if not evs:
        return None
    return evs[-1].payload, len({e.payload.content_hash for e in evs}), False


def _registrations(settings: Settings, kafka: bool) -> list[dict]:
    """(task_id, title, split, content_hash, produced_at) of every registration this home can see."""
    from store.catalog import Catalog

    rows = Catalog(settings).arrow(
        "SELECT task_id, title, split, content_hash, epoch(produced_at) AS t FROM task_registered_events").to_pylist()
    rows += read_registry(settings)
    if kafka:
        try:
            for ev in read_task_events(settings):
                p = ev.payload
                rows.append({"task_id": p.task_id, "title": p.title, "split": p.split,
                             "content_hash": p.content_hash, "t": ev.produced_at.timestamp()})
        except BrokerError as e:
            log.warning("tasks: cannot read the tasks topic (%s); checking the archive and %s only", e,
                        registry_file(settings))
    return rows


def registered_tasks(settings: Settings, *, kafka: bool = True) -> dict[str, Registered]:
    by_id: dict[str, list[dict]] = {}
    for r in _registrations(settings, kafka):
        by_id.setdefault(r["task_id"], []).append(r)
    out = {}
    for tid, rows in by_id.items():
        latest = max(rows, key=lambda r: r["t"])
        out[tid] = Registered(tid, frozenset(r["split"] for r in rows), frozenset(normalize_title(r["title"]) for r in rows),
                              latest["content_hash"], frozenset(r["content_hash"] for r in rows))
    return out
