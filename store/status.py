"""What `klong status` prints: per-partition lag of the archive behind Kafka, archive counts, dead letters,
conflicting duplicates (event ids archived with different contents; the views keep the first archived).

Lag is measured against the archive itself (the highest archived offset per partition of the topic's
current incarnation), not against Kafka's committed offsets: the archive is the truth. Tansu (the
embedded broker) reports a partition's end offset as its last batch's base offset + 1, so there lag is
a lower bound (exact with real Kafka); the sink's own "caught up" test is unaffected, since a
consumer's position only ever lands on batch boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from core.settings import Settings
from schemas.errors import BrokerError, ConfigError
from store.archive import recover_positions, walk
from store.catalog import Catalog


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    end_offset: int
    archived_to: int  # next offset the sink will read
    lag: int


def partition_lag(settings: Settings) -> list[PartitionLag]:
    try:
        cfg = settings.kafka_config()
        admin = KafkaAdminClient(**cfg, request_timeout_ms=5000)
        consumer = KafkaConsumer(**cfg, request_timeout_ms=5000)
    except KafkaError as e:
        raise BrokerError(f"cannot reach Kafka at {settings.bootstrap()}: {e}") from e
    try:
        ids = {t["name"]: t["topic_id"] for t in admin.describe_topics(settings.topics.all()) if t["error_code"] == 0}
        tps = [TopicPartition(t, p) for t in ids for p in sorted(consumer.partitions_for_topic(t) or [])]
        ends = consumer.end_offsets(tps) if tps else {}
        begins = consumer.beginning_offsets(tps) if tps else {}
        out = []
        for tp in tps:
            done = recover_positions(settings.archive, tp.topic, ids[tp.topic]).get(tp.partition, begins[tp])
            out.append(PartitionLag(tp.topic, tp.partition, ends[tp], done, max(0, ends[tp] - done)))
        return out
    finally:
        consumer.close()
        admin.close()


def unarchived_events(settings: Settings, timeout_s: float = 5.0) -> int:
    """Events Kafka holds that the archive does not (the sum of partition lags; a lower bound on the
    embedded broker). BrokerError / ConfigError when no Kafka answers within `timeout_s`."""
    from services.broker import probe_kafka

    probe_kafka(settings, timeout_s)
    return sum(p.lag for p in partition_lag(settings))


def wait_archived(settings: Settings, timeout_s: float, poll_s: float = 0.5) -> None:
    """Blocks until the archive holds everything Kafka holds (a sink must be running); TransientError
    after `timeout_s`."""
    import time

    from schemas.errors import TransientError

    deadline = time.monotonic() + timeout_s
    while (left := unarchived_events(settings)) > 0:
        if time.monotonic() > deadline:
            raise TransientError(f"Kafka still holds {left} events the archive does not after {timeout_s:.0f} s "
                                 "(is `klong sink run` running?)")
        time.sleep(poll_s)


def archive_summary(settings: Settings) -> dict:
    flushes, strays = walk(settings.archive)  # a directory, or an S3 prefix
    if settings.archive_url:  # objects are not stat'ed one by one: their manifests give the sizes
        nbytes = sum(d.manifest["files"][f.name]["bytes"] for d in flushes if d.manifest for f in d.files.values())
    else:
        nbytes = sum(f.lstat().st_size for d in flushes for f in d.files.values())  # what readers read, no stray
    cat = Catalog(settings)
    counts = cat.arrow("""
        SELECT 'rollouts' AS what, count(*) AS n FROM rollouts UNION ALL
        SELECT 'running rollouts', count(*) FROM rollouts WHERE status = 'running' UNION ALL
        SELECT 'steps', count(*) FROM steps UNION ALL
        SELECT 'tasks', count(*) FROM tasks UNION ALL
        SELECT 'judge results', count(*) FROM judge_results UNION ALL
        SELECT 'dead letters', count(*) FROM dead_letters UNION ALL
        SELECT 'conflicting duplicates', count(*) FROM conflicting_duplicates""").to_pylist()
    from store.integrity import quarantined

    return {"flush_dirs": len(flushes), "archive_bytes": nbytes, **{r["what"]: r["n"] for r in counts},
            "quarantined flush dirs": len(quarantined(settings.archive)),
            "stray entries ignored": len(strays)}  # `klong archive verify` lists them


def status(settings: Settings) -> dict:
    report: dict = {"settings": settings.describe(), "archive": archive_summary(settings)}
    try:
        report["partitions"] = [p.__dict__ for p in partition_lag(settings)]
    except (BrokerError, ConfigError) as e:
        report["partitions"] = None
        report["kafka_error"] = str(e)
    return report
