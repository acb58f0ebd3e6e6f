"""Reading archived offset ranges back from Kafka, for `klong archive verify|repair` (store.integrity).

    >>> with KafkaSide(settings) as kafka:
    ...     kafka.topic_ids()                       # {topic: current incarnation id}
    ...     kafka.committed()                       # {(topic, partition): the sink group's committed offset}
    ...     kafka.fetch("klong.rollouts", 0, 41, 99, timeout_s=60)   # records 42..99, or Unavailable

The embedded broker (Tansu) reports a partition's end offset as the base offset of its last record batch
+ 1, which is below the last offset it serves: "end <= last" is no proof that the last flush's records are
gone. So `fetch` never decides from the reported end alone: it reads until its position passes the range
(complete), or until a read returns nothing with the position at or past the reported end (the log ends
before the range does), or the timeout.
"""

from __future__ import annotations

import time

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from core.settings import Settings
from schemas.errors import BrokerError, TerminalError


class Unavailable(TerminalError):
    """Kafka does not (or no longer) hold the offsets asked for."""


class KafkaSide:
    """An admin client and an unsubscribed consumer on the settings' Kafka."""

    def __init__(self, settings: Settings, request_timeout_ms: int = 10_000):
        self.settings = settings
        cfg = settings.kafka_config()
        try:
            self.admin = KafkaAdminClient(**cfg, request_timeout_ms=request_timeout_ms)
            self.consumer = KafkaConsumer(**cfg, enable_auto_commit=False, request_timeout_ms=request_timeout_ms)
        except KafkaError as e:
            raise BrokerError(f"cannot reach Kafka at {settings.bootstrap()}: {e}") from e

    def __enter__(self) -> "KafkaSide":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.consumer.close(autocommit=False)
        finally:
            self.admin.close()

    def topic_ids(self) -> dict[str, str]:
        topics = self.settings.topics.all()
        return {t["name"]: t["topic_id"] for t in self.admin.describe_topics(topics) if t["error_code"] == 0}

    def committed(self) -> dict[tuple[str, int], int]:
        """The sink group's committed offset (the next offset to read) per topic partition. The sink commits
        only what it archived, so the archive must reach at least there."""
        group = self.settings.topics.sink_group
        offsets = self.admin.list_group_offsets({group: None}).get(group, {})
        return {(tp.topic, tp.partition): om.offset for tp, om in offsets.items() if om.offset is not None
                and om.offset >= 0}

    def fetch(self, topic: str, partition: int, after: int | None, through: int, timeout_s: float) -> list:
        """The records of offsets after+1..through (after None: from the partition's first offset), in order.
        Unavailable when Kafka no longer holds all of them."""
        tp = TopicPartition(topic, partition)
        c = self.consumer
        c.assign([tp])
        begin = c.beginning_offsets([tp])[tp]
        first = begin if after is None else after + 1
        if begin > first:
            raise Unavailable(f"Kafka holds {topic}+{partition} from offset {begin} on, not from {first} "
                              "(retention, or the broker restarted)")
        c.seek(tp, first)
        records, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = c.poll(timeout_ms=500).get(tp, [])
            records += [r for r in got if first <= r.offset <= through]
            position = c.position(tp)
            if position > through:
                return records
            if not got and position >= c.end_offsets([tp])[tp]:
                raise Unavailable(f"Kafka's log of {topic}+{partition} ends at offset {position - 1}, "
                                  f"before {through}")
        raise Unavailable(f"offsets {first}..{through} of {topic}+{partition} did not all arrive in {timeout_s:.0f} s")
