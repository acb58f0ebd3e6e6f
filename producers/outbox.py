"""The durable outbox: every event a producer emits is on local disk before `put` returns, and stays
there until Kafka has it (`retain="acked"`) or, by default, until the archive sink has archived it
(`retain="archived"`), because the embedded broker keeps everything in memory and forgets it on restart.

    with Outbox(settings) as outbox:            # spool in HOME/outbox, one process per directory
        outbox.put(event)                       # durable on return (fsync=True)
        outbox.flush(until="acked")             # wait for Kafka; default (retain): until archived by the sink

How it works:
- `put` appends (topic, key, value) to the spool (`producers.spool`, crc-checked segment files) and
  fsyncs (fsync="batch": a helper thread fsyncs every ~50 ms and `put` returns before; a *machine*
  crash can lose that window, a process crash loses nothing since the bytes are in the page cache).
- One sender thread ships spooled records in order with an idempotent KafkaProducer (acks=all, lz4)
  and notes each record's (partition, offset) and the topic's `topic_id` at that moment. On any
  failure it drops the producer, logs one line, backs off, reconnects, re-creates missing topics
  (`services.broker.ensure_topics`) and resends what is not acked. It never drops a record
  (`producers.outbox_sender`).
- retain="archived": about once a second the sender reads the topic ids and the sink group's
  committed offsets (`settings.topics.sink_group`); a record is archived when its topic still has
  the topic_id it was acked under and the committed offset of its partition is past its offset.
  A changed topic_id means the broker restarted (or the topic was recreated): every record of that
  topic not confirmed archived is sent again. Segments are deleted once all their records are done.
- Backpressure: when unfinished records reach `max_bytes`, `put` blocks (logged once) until the
  sender/sink catch up. Nothing is ever dropped.
- What became of each record (acked at partition/offset under a topic_id, done) is also appended to
  a sidecar of its segment (`producers.spool`), so a new process on the directory confirms acked
  records against the archive instead of resending them, and skips done ones. Those notes are not
  fsync'd: one lost in a crash costs a resend. Delivery is at-least-once; consumers dedup by event_id.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from core.settings import Settings
from producers.outbox_sender import _ACKED, _INFLIGHT, _PENDING, Sender, _Rec
from producers.spool import Spool, SpoolEntry
from schemas.errors import BrokerError, ConfigError, TerminalError, TransientError, ValidationError
from schemas.events import Envelope, encode, event_type, key_of

log = logging.getLogger("klong.outbox")

Retain = Literal["archived", "acked"]
FsyncMode = Union[bool, Literal["batch"]]
# Kafka's default max.request.size is 1 MiB; a record over it could never be sent and would block
# the spool forever, so it is refused at put (large steps go through schemas.claimcheck first).
MAX_RECORD_BYTES = 1_000_000
BATCH_SYNC_S = 0.05


def _human(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 1024:.0f} kB"


@dataclass(frozen=True)
class OutboxStats:
    records: int  # in the spool and not done yet (unsent + in flight + acked-not-archived)
    bytes: int  # spool bytes of those records
    unsent: int
    in_flight: int
    acked: int  # acked by Kafka, waiting for the sink (retain="archived")
    sent: int  # sends since open, resends included
    resent: int  # records sent again after a failure or a broker restart
    done: int  # records removed from the spool since open


class Outbox:
    def __init__(self, settings: Settings, directory: str | os.PathLike | None = None, *,
                 max_bytes: int = 256 << 20, fsync: FsyncMode = True, retain: Retain = "archived",
                 segment_bytes: int = 8 << 20, linger_ms: int = 5) -> None:
        if fsync not in (True, False, "batch"):
            raise ConfigError(f"outbox fsync must be True, False or 'batch', not {fsync!r}")
        if retain not in ("archived", "acked"):
            raise ConfigError(f"outbox retain must be 'archived' or 'acked', not {retain!r}")
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ConfigError("outbox max_bytes and segment_bytes must be positive")
        self.settings, self.retain, self.fsync, self.max_bytes = settings, retain, fsync, max_bytes
        self.directory = Path(directory or settings.outbox_dir)
        self.linger_ms = linger_ms
        self._spool = Spool(self.directory, segment_bytes)
        self._cv = threading.Condition()
        self._wlock = threading.Lock()  # append + register, so records are registered in spool order
        self._recs: dict[int, _Rec] = {}  # insertion order = seq order
        self._todo: list[int] = []  # heap of seqs to (re)send
        self._seg_live: dict[int, int] = {}
        self._next_seq = self._bytes = 0
        self._sent = self._resent = self._done = 0
        self._closed = self._stop = False
        self._dirty = False
        self._last_full_log = -1e9
        for entry in self._spool.recovered:
            note = self._spool.notes.get((entry.segment, entry.pos), [])
            if note[:1] == ["done"]:
                continue
            acked = note[:1] == ["acked"] and len(note) == 4 and retain == "archived"
            rec = self._register(entry, send=not acked)
            if acked:  # Kafka had it: confirm it archived (or resend if the topic changed), don't resend now
                rec.state, rec.partition, rec.offset = _ACKED, int(note[1]), int(note[2])
                rec.topic_id = None if note[3] == "-" else note[3]
        for seg in self._spool.segments_on_disk - set(self._seg_live):
            self._spool.delete_segment(seg)  # a previous run's segment with no whole record left
        if self._recs:
            unsent = sum(r.state == _PENDING for r in self._recs.values())
            log.info("outbox: %d records from a previous run in %s (%d to send again, %d acked: waiting for the "
                     "archive)", len(self._recs), self.directory, unsent, len(self._recs) - unsent)
        self._sender_loop = Sender(self)  # the sender thread's Kafka clients (producers.outbox_sender)
        self._sender = threading.Thread(target=self._sender_loop.run, name="klong-outbox-sender", daemon=True)
        self._sender.start()
        self._syncer = None
        if fsync == "batch":
            self._syncer = threading.Thread(target=self._sync_loop, name="klong-outbox-fsync", daemon=True)
            self._syncer.start()

    # ---- producer side -------------------------------------------------------------------------

    def put(self, ev: Envelope) -> None:
        """Spools one event (durable on return, unless fsync='batch'); blocks while the outbox is full."""
        value = encode(ev)
        key = key_of(ev).encode()
        if len(value) + len(key) > MAX_RECORD_BYTES:
            raise ValidationError(f"{event_type(ev)} event {ev.event_id} is {len(value)} bytes, over the "
                                  f"{MAX_RECORD_BYTES} byte Kafka limit (steps: use schemas.claimcheck)")
        topic = self.settings.topics.for_event(ev)
        self._wait_for_room()
        with self._wlock:
            entry = self._spool.append(topic, key, value)
            if self.fsync is True:
                self._spool.sync()
            with self._cv:
                self._dirty = True
                self._register(entry)
                self._cv.notify_all()

    def _register(self, entry: SpoolEntry, send: bool = True) -> _Rec:
        rec = _Rec(self._next_seq, entry)
        self._next_seq += 1
        self._recs[rec.seq] = rec
        if send:
            heapq.heappush(self._todo, rec.seq)
        self._bytes += entry.size
        self._seg_live[entry.segment] = self._seg_live.get(entry.segment, 0) + 1
        return rec

    def _wait_for_room(self) -> None:
        with self._cv:
            if self._closed:
                raise TerminalError(f"outbox {self.directory} is closed")
            if self._bytes < self.max_bytes:
                return
            # Steady backpressure (a producer faster than the sink) blocks often: say so once a minute.
            if time.monotonic() - self._last_full_log > 60:
                self._last_full_log = time.monotonic()
                what = "unarchived" if self.retain == "archived" else "unacked"
                log.warning("outbox full (%s %s in %s): waiting for Kafka/the sink (`klong sink run`)",
                            _human(self._bytes), what, self.directory)
            while self._bytes >= self.max_bytes and not self._closed:
                self._cv.wait(0.5)
            if self._closed:
                raise TerminalError(f"outbox {self.directory} was closed while put waited for room")

    def flush(self, timeout: float = 60.0, until: Optional[Retain] = None) -> None:
        """Waits until every record put so far is acked by Kafka (until="acked") or also archived by
        the sink (until="archived"). The default is the outbox's `retain`: with retain="archived" it
        needs a running sink, so a producer command that must not wait for one passes until="acked".
        TransientError (BrokerError when Kafka did not ack) on timeout."""
        until = until or self.retain
        if until == "archived" and self.retain == "acked":
            raise ConfigError("flush(until='archived') needs an outbox with retain='archived'")
        target = self._next_seq

        def caught_up() -> bool:
            for rec in self._recs.values():
                if rec.seq >= target:
                    return True
                if until == "archived" or rec.state != _ACKED:
                    return False
            return True

        with self._cv:
            if not self._cv.wait_for(caught_up, timeout):
                left = sum(1 for r in self._recs.values() if r.seq < target and (until == "archived" or r.state != _ACKED))
                if until == "archived":
                    raise TransientError(f"outbox flush timed out after {timeout}s: {left} records not archived "
                                         "yet (is `klong sink run` running?)")
                raise BrokerError(f"outbox flush timed out after {timeout}s: {left} records not acked by Kafka "
                                  f"at {self.settings.bootstrap_servers or self.settings.home}")

    def pending(self) -> int:
        """Records still in the spool: not yet acked, or (retain="archived") not yet archived."""
        with self._cv:
            return len(self._recs)

    def stats(self) -> OutboxStats:
        with self._cv:
            states = [r.state for r in self._recs.values()]
            return OutboxStats(len(states), self._bytes, states.count(_PENDING), states.count(_INFLIGHT),
                               states.count(_ACKED), self._sent, self._resent, self._done)

    def close(self, timeout: float = 10.0) -> None:
        """Waits up to `timeout` s for Kafka to ack what is spooled, then stops. What is left stays in
        the spool and is sent by the next Outbox on this directory."""
        if self._closed:
            return
        with self._cv:
            self._cv.wait_for(lambda: all(r.state == _ACKED for r in self._recs.values()), timeout)
            self._closed = self._stop = True
            self._cv.notify_all()
        self._sender.join(timeout=30)
        if self._syncer:
            self._syncer.join(timeout=5)
        with self._wlock:
            self._spool.close()
        if self._recs:
            log.info("outbox: %d records stay in %s (not yet %s); they are sent when an Outbox opens it again",
                     len(self._recs), self.directory, self.retain)

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sync_loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                self._cv.wait(BATCH_SYNC_S)
                dirty, self._dirty = self._dirty, False
            if dirty:
                self._spool.sync()
