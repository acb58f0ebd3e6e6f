"""The outbox's sender thread: ships spooled records to Kafka in order, confirms them archived, retries forever.

    sender = Sender(outbox)        # its own Kafka clients; everything else is the outbox's, under outbox._cv
    threading.Thread(target=sender.run, daemon=True).start()

One idempotent KafkaProducer (acks=all, lz4) sends batches of pending records and notes each record's
(partition, offset) and its topic's `topic_id`. retain="archived": about once a second it reads the sink
group's committed offsets and the topic ids; a record is done when its partition's committed offset is past
it under the same topic_id, and sent again when the topic_id changed (the broker restarted). On any failure
it drops its clients, logs one line per outage, backs off and reconnects: it never drops a record.
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import Optional

from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from kafka.errors import KafkaTimeoutError

from producers.spool import SpoolEntry
from services.broker import ensure_topics

log = logging.getLogger("klong.outbox")

POLL_S = 1.0
BATCH_RECORDS, BATCH_BYTES = 2000, 8 << 20
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 5.0
_PENDING, _INFLIGHT, _ACKED = 0, 1, 2  # done records are removed, not marked


class _Rec:
    __slots__ = ("seq", "entry", "state", "partition", "offset", "topic_id")

    def __init__(self, seq: int, entry: SpoolEntry) -> None:
        self.seq, self.entry, self.state = seq, entry, _PENDING
        self.partition = self.offset = -1
        self.topic_id: Optional[str] = None


class Sender:
    """The sender thread's state (its Kafka clients, the topic ids it knows) and loop over `outbox`'s records."""

    def __init__(self, outbox) -> None:
        self.ob = outbox
        # Sender-thread state: never touched by other threads.
        self._producer: Optional[KafkaProducer] = None
        self._admin: Optional[KafkaAdminClient] = None
        self._topic_ids: dict[str, Optional[str]] = {}
        self._failures = 0
        self._last_warning = 0.0

    def run(self) -> None:
        """The thread's loop until the outbox stops: connect, send, confirm, retry on any failure."""
        ob = self.ob
        backoff, next_poll = BACKOFF_MIN_S, 0.0
        while True:
            with ob._cv:
                if ob._stop:
                    break
            try:
                if self._producer is None:
                    self._connect()
                sent = self._send_batch()
                if ob.retain == "archived" and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + POLL_S
                    self._poll_archive()
                self._drop_done_segments()
                ob._spool.flush_notes()
                if self._failures:
                    log.info("outbox: delivering to Kafka again after %d failed attempts", self._failures)
                    self._failures, backoff = 0, BACKOFF_MIN_S
                if not sent:  # idle: sleep until a put (notify) or the next archive poll
                    idle = POLL_S if ob.retain == "acked" else max(0.05, next_poll - time.monotonic())
                    with ob._cv:
                        if not ob._stop and not ob._todo:
                            ob._cv.wait(idle)
            except Exception as e:  # noqa: BLE001 - the sender must outlive any client error; it retries
                self._on_failure(e, backoff)
                with ob._cv:
                    ob._cv.wait_for(lambda: ob._stop, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        self._disconnect()

    def _connect(self) -> None:
        ob = self.ob
        cfg = ob.settings.kafka_config()
        fast = {"reconnect_backoff_max_ms": 1000, "bootstrap_timeout_ms": 5000, "request_timeout_ms": 10_000}
        self._producer = KafkaProducer(
            **cfg, **fast, enable_idempotence=True, acks="all", compression_type="lz4", linger_ms=ob.linger_ms,
            batch_size=512 << 10, max_block_ms=5000, delivery_timeout_ms=30_000,
            # Topics come from ensure_topics with the configured partitions, never from auto-creation.
            allow_auto_create_topics=False)
        with ob._cv:
            spooled = {r.entry.topic for r in ob._recs.values()}
        ensure_topics(ob.settings, sorted(set(ob.settings.topics.all()) | spooled))
        if ob.retain == "archived":
            self._admin = KafkaAdminClient(**cfg, **fast)
            self._topic_ids.update(self._describe(sorted(set(self._topic_ids) | spooled)))

    def _disconnect(self) -> None:
        for client in (self._producer, self._admin):
            if client is not None:
                try:
                    client.close(timeout=1) if client is self._producer else client.close()
                except Exception as e:  # noqa: BLE001 - closing a broken client must not stop the retry loop
                    log.debug("outbox: closing a Kafka client failed: %s", e)
        self._producer = self._admin = None

    def _on_failure(self, e: Exception, backoff: float) -> None:
        ob = self.ob
        self._disconnect()
        with ob._cv:
            for rec in ob._recs.values():
                if rec.state == _INFLIGHT:
                    rec.state = _PENDING
                    heapq.heappush(ob._todo, rec.seq)
            waiting = len(ob._recs)
        self._failures += 1
        # One warning per outage, then one every 30 s: a long outage must not flood the log.
        if self._failures == 1 or time.monotonic() - self._last_warning > 30:
            self._last_warning = time.monotonic()
            where = ob.settings.bootstrap_servers or f"the embedded broker of {ob.settings.home}"
            log.warning("outbox: cannot deliver to Kafka at %s (%s: %s); %d records kept in %s, retrying in %.1fs",
                        where, type(e).__name__, e, waiting, ob.directory, backoff)

    def _take_batch(self) -> list[_Rec]:
        ob = self.ob
        batch, size = [], 0
        with ob._cv:
            while ob._todo and len(batch) < BATCH_RECORDS and size < BATCH_BYTES:
                rec = ob._recs.get(heapq.heappop(ob._todo))
                if rec is None or rec.state != _PENDING:
                    continue  # done meanwhile, or queued twice
                rec.state = _INFLIGHT
                batch.append(rec)
                size += rec.entry.size
        return batch

    def _send_batch(self) -> int:
        ob = self.ob
        batch = self._take_batch()
        if not batch:
            return 0
        if ob.retain == "archived":
            unknown = sorted({r.entry.topic for r in batch} - {t for t, i in self._topic_ids.items() if i})
            if unknown:
                self._topic_ids.update(self._describe(unknown))
        ids = dict(self._topic_ids)  # the incarnation each record is sent to; read *before* sending
        futures = []
        for rec in batch:
            topic, key, value = ob._spool.read(rec.entry)
            futures.append(self._producer.send(topic, key=key, value=value))
        self._producer.flush(timeout=15)
        error = None
        with ob._cv:
            for rec, fut in zip(batch, futures):
                ob._sent += 1
                if not fut.succeeded():  # failed, or (defensively) still not done after flush
                    error = error or fut.exception or KafkaTimeoutError("send not completed after flush")
                    continue
                if ob.retain == "acked":
                    self._finish(rec)
                else:
                    rec.state, rec.partition, rec.offset = _ACKED, fut.value.partition, fut.value.offset
                    rec.topic_id = ids.get(rec.entry.topic)
                    ob._spool.note(rec.entry, "acked", str(rec.partition), str(rec.offset), rec.topic_id or "-")
            ob._cv.notify_all()
        if error is not None:
            raise error
        return len(batch)

    def _finish(self, rec: _Rec) -> None:
        """Record done: forget it (caller holds the lock)."""
        ob = self.ob
        del ob._recs[rec.seq]
        ob._spool.note(rec.entry, "done")
        ob._bytes -= rec.entry.size
        ob._seg_live[rec.entry.segment] -= 1
        ob._done += 1

    def _describe(self, topics: list[str]) -> dict[str, Optional[str]]:
        if not topics:
            return {}
        return {t["name"]: (t["topic_id"] if t["error_code"] == 0 else None)
                for t in self._admin.describe_topics(topics)}

    def _poll_archive(self) -> None:
        ob = self.ob
        with ob._cv:
            acked = [r for r in ob._recs.values() if r.state == _ACKED]
        if not acked:
            return
        topics = sorted({r.entry.topic for r in acked})
        group = ob.settings.topics.sink_group
        before = self._describe(topics)
        committed = self._admin.list_group_offsets(group).get(group, {})
        after = self._describe(topics)
        if before != after:
            return  # an incarnation changed while we read the offsets: they may belong to either; ask again
        self._topic_ids.update(after)
        resend: dict[str, int] = {}
        with ob._cv:
            for rec in acked:
                if rec.state != _ACKED:
                    continue
                if after.get(rec.entry.topic) != rec.topic_id:
                    rec.state = _PENDING  # the broker lost it before the sink archived it
                    heapq.heappush(ob._todo, rec.seq)
                    resend[rec.entry.topic] = resend.get(rec.entry.topic, 0) + 1
                    continue
                off = committed.get(TopicPartition(rec.entry.topic, rec.partition))
                if off is not None and off.offset > rec.offset:
                    self._finish(rec)
            ob._resent += sum(resend.values())
            ob._cv.notify_all()
        if resend:
            log.warning("outbox: Kafka lost %d acked records the sink had not archived (topic %s has a new "
                        "topic_id: broker restart?); sending them again", sum(resend.values()), ", ".join(resend))
        if any(i is None for i in after.values()):
            ensure_topics(ob.settings, topics)  # a memory broker forgot them: recreate with our partitions

    def _drop_done_segments(self) -> None:
        ob = self.ob
        with ob._cv:
            current = ob._spool.write_segment
            empty = [s for s, n in ob._seg_live.items() if n == 0 and s != current]
            for s in empty:
                del ob._seg_live[s]
        for s in empty:
            ob._spool.delete_segment(s)
