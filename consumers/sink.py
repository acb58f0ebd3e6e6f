"""The archive sink: Kafka -> Parquet, exactly-once results without Kafka transactions.

    klong sink run [--until-idle] [--group]

Contract (the quix-streams / Kafka Connect order): buffer records per partition, `flush` a
partition's buffer as one atomically renamed directory named by its offsets (`store.archive`),
*then* commit the offsets. On start each partition resumes after the highest archived offset, so a
`kill -9` anywhere re-reads at most the unflushed tail and never writes a range twice. Each flush's
manifest records the last offset read before it, so `klong archive verify` sees a lost flush as a break
in that chain. Producer resends (at-least-once on the wire) are removed by `event_id` in the SQL views.

Every message that is not a valid event (bad JSON, bad UTF-8, unknown type, wrong types, missing
fields, bad token arrays, missing claim-check blob) goes to `dead_letters` with its raw bytes, the
error and its offset; the sink never stops on one.

By default one sink reads every partition (manual assignment). `--group` joins the consumer group
`<prefix>.sink` so several sink processes split the partitions; a partition is flushed before it is
given away, and resumed from the archive when it is received.

With `KLONG_ARCHIVE_URL=s3://bucket/prefix` the flushes go to the bucket (store.archive_s3): each flush's
objects, then its manifest as the commit point, then the offsets; a flush a killed sink left without its
manifest is deleted when its partition is resumed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from core.settings import Settings
from store.flush import FlushJob, run_flush, worker_init
from schemas.errors import BrokerError
from store.archive import clean_tmp, recover_positions, writer_lock
from store.archive_s3 import drop_unfinished
from core.objstore import is_s3

log = logging.getLogger("klong.sink")
TOPIC_ID_CHECK_S = 1.0


@dataclass
class SinkStats:
    events: int = 0
    dead_letters: int = 0
    flushes: int = 0
    bytes: int = 0
    by_type: dict = field(default_factory=lambda: defaultdict(int))


@dataclass
class _Buffer:
    records: list = field(default_factory=list)  # kafka ConsumerRecords, in offset order
    nbytes: int = 0
    since: float = 0.0  # monotonic time of the oldest buffered record
    after: int | None = None  # the last offset read before the first buffered record (None: the partition's start)


class Sink:
    def __init__(self, settings: Settings, *, flush_bytes: int = 8 << 20, flush_interval_s: float = 1.0,
                 group: bool = False, topics: list[str] | None = None, writers: int = 1):
        self.settings = settings
        self.archive = settings.archive  # a local directory, or an S3 prefix (core.objstore)
        if is_s3(self.archive):
            self.archive.check()  # a wrong bucket, endpoint or key fails here, in one line, not in a writer
        self.flush_bytes = flush_bytes
        self.flush_interval_s = flush_interval_s
        self.group = group
        self.topics = topics or settings.topics.all()
        self.stats = SinkStats()
        self._buffers: dict[TopicPartition, _Buffer] = defaultdict(_Buffer)
        self._next: dict[TopicPartition, int] = {}  # next offset we expect per partition
        self._topic_ids: dict[str, str] = {}  # the incarnation we are reading
        self._ids_current: dict[str, str] = {}  # what the broker said at _ids_checked_at
        self._ids_checked_at = float("-inf")
        # Writer processes (spawned: never fork a process that runs kafka-python's threads). Each is FIFO and
        # a partition always goes to the same one, so a partition's flushes are renamed in offset order: a
        # later range never lands before an earlier one (recovery takes the highest archived offset). One
        # by default: on 2 cores a second one measured slower (ingest ratio 0.48 vs 0.60); more help where
        # fsync is slow and cores are free. Started now: spawning takes ~1 s.
        ctx = multiprocessing.get_context("spawn")
        self._writers = [ProcessPoolExecutor(1, mp_context=ctx, initializer=worker_init, initargs=(os.getpid(),))
                         for _ in range(max(1, writers))]
        self._warmup = [w.submit(os.getpid) for w in self._writers]
        self._writer_of: dict[TopicPartition, ProcessPoolExecutor] = {}
        self._inflight: deque = deque()  # (future, tp, last offset, bytes) of writes not yet committed
        cfg = settings.kafka_config()
        try:
            self.admin = KafkaAdminClient(**cfg, request_timeout_ms=10_000)
            self.consumer = KafkaConsumer(
                **cfg, group_id=settings.topics.sink_group, enable_auto_commit=False,
                auto_offset_reset="earliest", fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20,
                max_poll_interval_ms=5000, session_timeout_ms=6000, heartbeat_interval_ms=1000,
                consumer_timeout_ms=float("inf"),
            )
        except KafkaError as e:
            raise BrokerError(f"cannot reach Kafka at {settings.bootstrap()}: {e}") from e

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Blocks until the writer processes are up (benchmarks time the steady state, not the spawn)."""
        for f in self._warmup:
            f.result(timeout)

    # ---- positions ------------------------------------------------------------------------------

    def _refresh_topic_ids(self) -> dict[str, str]:
        return {t["name"]: t["topic_id"] for t in self.admin.describe_topics(self.topics) if t["error_code"] == 0}

    def _current_topic_ids(self) -> dict[str, str]:
        """Topic ids as of at most `TOPIC_ID_CHECK_S` ago: one admin round trip per flush cost ~10% of the
        throughput. A restart seen late cannot lose events: offsets going backwards are caught at once,
        and records of a new incarnation filed under the old id are read again from the new one's start
        (duplicates, which the views remove by event_id)."""
        now = time.monotonic()
        if now - self._ids_checked_at >= TOPIC_ID_CHECK_S:
            self._ids_current, self._ids_checked_at = self._refresh_topic_ids(), now
        return self._ids_current

    def _seek_from_archive(self, tps: list[TopicPartition]) -> None:
        topics = {tp.topic for tp in tps}
        if not topics <= self._topic_ids.keys():
            self._topic_ids.update(self._refresh_topic_ids())
        with writer_lock(self.archive, exclusive=True):
            positions = {t: recover_positions(self.archive, t, self._topic_ids.get(t, "unknown")) for t in topics}
            if is_s3(self.archive):  # the writers of these partitions' unfinished flushes are gone (the lock)
                for t in topics:
                    drop_unfinished(self.archive, t, self._topic_ids.get(t, "unknown"),
                                    {tp.partition for tp in tps if tp.topic == t})
        for tp in tps:
            pos = positions[tp.topic].get(tp.partition)
            self._buffers.pop(tp, None)
            if pos is None:
                self.consumer.seek_to_beginning(tp)
                self._next.pop(tp, None)
            else:
                self.consumer.seek(tp, pos)
                self._next[tp] = pos

    def _assign_all(self) -> list[TopicPartition]:
        ids = self._refresh_topic_ids()
        missing = [t for t in self.topics if t not in ids]
        if missing:
            raise BrokerError(f"topics {missing} do not exist on {self.settings.bootstrap()} (run `klong broker start`)")
        self._topic_ids = ids
        tps = [TopicPartition(t, p) for t in self.topics for p in sorted(self.consumer.partitions_for_topic(t) or [])]
        self.consumer.assign(tps)
        self._seek_from_archive(tps)
        return tps

    # ---- main loop ------------------------------------------------------------------------------

    def run(self, until_idle: bool = False, idle_s: float = 1.0, should_stop: Callable[[], bool] = lambda: False,
            progress: Callable[[SinkStats], None] | None = None) -> SinkStats:
        clean_tmp(self.archive)
        if self.group:
            self.consumer.subscribe(self.topics, listener=_Rebalance(self))
        else:
            self._assign_all()
        last_data = time.monotonic()
        try:
            while not should_stop():
                try:
                    batch = self.consumer.poll(timeout_ms=100, max_records=20_000)
                    now = time.monotonic()
                    for tp, records in batch.items():
                        self._accept(tp, records, now)
                    if batch:
                        last_data = now
                    # Flush by size, by age, and whenever the partitions are drained (a poll came back empty).
                    if self._due(now) or not batch:
                        self.flush()
                        if progress:
                            progress(self.stats)
                    if until_idle and not batch and now - last_data >= idle_s and self._caught_up():
                        break
                except KafkaError as e:
                    # Broker away (restart, network): keep what is buffered and retry; nothing is committed
                    # that is not archived, and the archive decides where reading resumes.
                    log.warning("kafka unavailable (%s); retrying in 1 s", e)
                    time.sleep(1.0)
        finally:
            try:
                self.flush(wait=True)
            except KafkaError as e:
                log.warning("final flush skipped, kafka unavailable (%s): the next run re-reads from the archive", e)
            self.close()
        return self.stats

    def _accept(self, tp: TopicPartition, records: list, now: float) -> None:
        expected = self._next.get(tp)
        if expected is not None and records[0].offset < expected:
            # Offsets went backwards: the topic was recreated (memory broker restart).
            self._on_reset(tp.topic)
            return
        buf = self._buffers[tp]
        if not buf.records:
            # The manifest records where this flush continues from: a lost flush before it shows as a gap.
            buf.since, buf.after = now, (expected - 1 if expected is not None else None)
        buf.records.extend(records)
        buf.nbytes += sum(len(r.value or b"") for r in records)
        self._next[tp] = records[-1].offset + 1

    def _due(self, now: float) -> bool:
        total = sum(b.nbytes for b in self._buffers.values())
        oldest = min((b.since for b in self._buffers.values() if b.records), default=now)
        return total >= self.flush_bytes or (total and now - oldest >= self.flush_interval_s)

    def _caught_up(self) -> bool:
        if any(b.records for b in self._buffers.values()):
            return False
        tps = list(self.consumer.assignment())
        if not tps:
            return True
        # The high watermarks of the last fetch responses; asking the broker (end_offsets) instead queues
        # behind the pending long-poll fetch and cost ~0.4 s per check.
        ends = {tp: self.consumer.highwater(tp) for tp in tps}
        if any(end is None for end in ends.values()):
            ends = self.consumer.end_offsets(tps)
        return all(self.consumer.position(tp) >= ends[tp] for tp in tps)

    def _on_reset(self, topic: str) -> None:
        """A topic got a new incarnation: drop what is buffered (producers' outboxes still hold anything
        not confirmed archived and resend it) and read the new incarnation from its start."""
        log.warning("topic %s was recreated (broker restart?): re-reading it from the start", topic)
        self._topic_ids.update(self._refresh_topic_ids())
        tps = [tp for tp in self.consumer.assignment() if tp.topic == topic]
        self._seek_from_archive(tps)

    # ---- flush ----------------------------------------------------------------------------------

    def flush(self, tps: list[TopicPartition] | None = None, wait: bool = False) -> None:
        """Writes every buffered partition (or `tps`) to the archive, then commits their offsets.

        Decoding, Parquet encoding, fsync and rename run in the writer processes (`store.flush`), so
        the second core works while this one consumes. Offsets are committed only for writes that completed.
        `wait=True` returns once everything handed over is renamed into the archive.
        """
        targets = [tp for tp in (tps or list(self._buffers)) if self._buffers.get(tp) and self._buffers[tp].records]
        if targets:
            current = self._current_topic_ids()
            for tp in targets:
                if tp not in self._buffers:  # dropped by a reset of its topic earlier in this loop
                    continue
                if current.get(tp.topic) != self._topic_ids.get(tp.topic):
                    self._on_reset(tp.topic)  # buffered records may belong to either incarnation: drop them
                    continue
                buf = self._buffers.pop(tp)
                recs = buf.records
                job = FlushJob.of(self.archive, self.settings.blob_dir, tp.topic, current[tp.topic], tp.partition, recs,
                                  after=buf.after)
                # Bound memory to two flushes' worth queued behind the worker, without stalling the consumer
                # on a flush that spans several partitions.
                while self._inflight and sum(f[3] for f in self._inflight) >= 2 * self.flush_bytes:
                    self._reap(block=True, one=True)
                writer = self._writer_of.setdefault(tp, self._writers[len(self._writer_of) % len(self._writers)])
                self._inflight.append((writer.submit(run_flush, job), tp, recs[-1].offset, buf.nbytes))
        self._reap(block=wait)

    def _reap(self, block: bool, one: bool = False) -> None:
        """Commits the offsets of finished writes, in order; re-raises a failed write (disk full...)."""
        commits = {}
        while self._inflight and (block or self._inflight[0][0].done()) and not (one and commits):
            future, tp, end, nbytes = self._inflight.popleft()
            result = future.result()
            commits[tp] = OffsetAndMetadata(end + 1, "", -1)
            self.stats.flushes += 1
            self.stats.bytes += nbytes
            self.stats.dead_letters += result.dead_letters
            for etype, n in result.by_type.items():
                self.stats.by_type[etype] += n
                self.stats.events += n
        if commits:
            # Asynchronous: the archive is the truth; the commit informs lag, producers' outboxes and
            # `klong archive verify` (how far the archive must reach). `flush(wait=True)` (the last flush before
            # close or a rebalance) commits synchronously, so that commit is not lost with the connection.
            if block and not one:
                try:
                    self.consumer.commit(commits)
                except KafkaError as e:  # a rebalance in progress, the broker away: as an async failure
                    _log_commit_failure(commits, e)
            else:
                self.consumer.commit_async(commits, callback=_log_commit_failure)

    def close(self) -> None:
        for w in self._writers:
            w.shutdown(wait=True)
        try:
            self.consumer.close(autocommit=False)
        finally:
            self.admin.close()


def _log_commit_failure(offsets, result) -> None:
    if isinstance(result, Exception):
        log.warning("offset commit failed (archive is still consistent): %s", result)


class _Rebalance(ConsumerRebalanceListener):
    """Group mode: flush what we hold before a partition leaves; resume from the archive when one arrives."""

    def __init__(self, sink: Sink):
        self.sink = sink

    def on_partitions_revoked(self, revoked):
        self.sink.flush(list(revoked), wait=True)  # the next owner resumes from the archive: it must be complete
        for tp in revoked:
            self.sink._buffers.pop(tp, None)
            self.sink._next.pop(tp, None)

    def on_partitions_assigned(self, assigned):
        self.sink._seek_from_archive(list(assigned))
