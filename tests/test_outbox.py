"""Durable outbox against the real broker: delivery, crash recovery, torn writes, locking,
backpressure, and the property the system rests on: a broker restart loses nothing unarchived."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from services.broker import BrokerProcess, ensure_topics, free_port
from core.settings import Settings, Topics
from producers.outbox import Outbox
from schemas.errors import BrokerError, ConfigError, ValidationError
from schemas.events import (JudgeRequested, JudgeRequestedPayload, Step, StepPayload, TaskPayload, TaskRegistered,
                            decode, encode, key_of, new_event)
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[1]


def read_topics(settings: Settings, topics: list[str], timeout: float = 120.0) -> list[tuple[str, int, int, bytes, bytes]]:
    """Everything in `topics` now: (topic, partition, offset, key, value), via assign + seek, no group."""
    consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, allow_auto_create_topics=False)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        if not tps:  # the topics do not exist (yet): a restarted memory broker has none
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(tps)
        out, deadline = [], time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for tp, msgs in consumer.poll(200).items():
                out.extend((m.topic, m.partition, m.offset, m.key, m.value) for m in msgs)
        return out
    finally:
        consumer.close()


def steps(n: int, rollouts: int = 5, size: int = 200, start: int = 0) -> list[Step]:
    return [new_event(Step, rollout_id=f"r{i % rollouts}", payload=StepPayload(
        step_idx=i // rollouts, role="tool", content=f"{i}:" + "x" * size)) for i in range(start, start + n)]


def offline(settings: Settings) -> Settings:
    """Same topics and home, but no broker configured: the outbox can only spool."""
    return Settings(home=settings.home / "offline", topics=settings.topics, partitions=settings.partitions)


def ids_in(records) -> list[str]:
    return [decode(v).event_id for *_, v in records]


def test_everything_put_arrives_exactly_as_put(settings):
    events = steps(300) + [
        new_event(TaskRegistered, payload=TaskPayload(task_id="t1", title="paper", split="train")),
        new_event(JudgeRequested, rollout_id="r1", payload=JudgeRequestedPayload(
            request_id="q1", step_idx=3, task_id="t1", priority="eval")),
    ]
    with Outbox(settings, retain="acked", segment_bytes=8192) as outbox:
        for ev in events:
            outbox.put(ev)
        outbox.flush(30)
        assert outbox.pending() == 0
        # Done segments are deleted by the sender thread after their last record is acked (its next pass,
        # later than flush's return under load): at most the one being written is left.
        wait_for("the acked segments deleted", lambda: len(list(outbox.directory.glob("seg-*.log"))) <= 1,
                 timeout_s=120)
    got = read_topics(settings, settings.topics.all())
    assert sorted(ids_in(got)) == sorted(ev.event_id for ev in events)
    by_id = {ev.event_id: ev for ev in events}
    for topic, _, _, key, value in got:
        ev = decode(value)
        assert ev == by_id[ev.event_id]
        assert key == key_of(ev).encode() and topic == settings.topics.for_event(ev)
    assert {t for t, *_ in got} == {settings.topics.rollouts, settings.topics.tasks, settings.topics.judge_eval}


def test_a_new_process_confirms_acked_records_instead_of_resending(settings):
    """Acked records left in the spool (closed before the sink archived them) are confirmed against the
    sink's committed offsets by the next Outbox on the directory, not sent again; done ones are skipped."""
    from consumers.sink import Sink

    events = steps(120)
    with Outbox(settings, segment_bytes=16384) as outbox:
        for ev in events:
            outbox.put(ev)
        outbox.flush(30, until="acked")
        assert outbox.stats().acked == 120
    Sink(settings).run(until_idle=True)
    with Outbox(settings) as outbox:
        st = outbox.stats()
        assert (st.records, st.unsent, st.acked) == (120, 0, 120)
        outbox.flush(30)  # until archived: the committed offsets confirm every one
        assert outbox.stats().sent == 0
    with Outbox(settings) as outbox:  # everything done: nothing registered, the spool is emptied
        assert outbox.stats().records == 0
    assert not list(outbox.directory.glob("seg-*"))
    assert sorted(ids_in(read_topics(settings, [settings.topics.rollouts]))) == sorted(ev.event_id for ev in events)


def test_oversized_event_is_refused_at_put(settings):
    with Outbox(offline(settings)) as outbox:
        with pytest.raises(ValidationError, match="over the"):
            outbox.put(steps(1, size=1_100_000)[0])
        assert outbox.pending() == 0
        outbox.close(timeout=0)


def test_process_killed_mid_put_loses_nothing_that_put_returned(settings, tmp_path):
    spool = tmp_path / "spool"
    script = textwrap.dedent(f"""
        import sys
        from core.settings import Settings, Topics
        from producers.outbox import Outbox
        from schemas.events import Step, StepPayload, new_event
        # No broker configured: nothing can be sent before the kill.
        s = Settings(home={str(tmp_path / 'child')!r}, topics=Topics({settings.topics.prefix!r}))
        ob = Outbox(s, {str(spool)!r}, fsync="batch")
        i = 0
        while True:
            ev = new_event(Step, rollout_id=f"r{{i % 7}}", payload=StepPayload(step_idx=i, role="tool", content="y" * 500))
            ob.put(ev)
            print(ev.event_id, flush=True)
            i += 1
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    put_ids = [child.stdout.readline().strip() for _ in range(400)]
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert all(put_ids) and not read_topics(settings, [settings.topics.rollouts])

    with Outbox(settings, spool, retain="acked") as outbox:
        assert outbox.pending() >= 400
        outbox.flush(30)
    delivered = set(ids_in(read_topics(settings, [settings.topics.rollouts])))
    assert set(put_ids) <= delivered


def test_torn_tail_is_truncated_on_open(settings, tmp_path):
    spool = tmp_path / "spool"
    events = steps(50)
    with Outbox(offline(settings), spool) as outbox:
        for ev in events:
            outbox.put(ev)
        with pytest.raises(BrokerError, match="not acked"):
            outbox.flush(0.2, until="acked")
        outbox.close(timeout=0)
    (segment,) = spool.glob("seg-*.log")
    whole = segment.stat().st_size
    with open(segment, "ab") as f:  # a crash in the middle of a write: half a header, then garbage
        f.write(b"\x10\x00\x00\x00garbage-bytes")

    with Outbox(settings, spool, retain="acked") as outbox:
        assert segment.stat().st_size == whole
        assert outbox.pending() == 50
        outbox.flush(30)
    assert sorted(ids_in(read_topics(settings, [settings.topics.rollouts]))) == sorted(ev.event_id for ev in events)


def test_second_outbox_on_same_directory_is_refused(settings):
    with Outbox(offline(settings), settings.outbox_dir) as first:
        with pytest.raises(ConfigError, match=f"in use by another producer \\(pid {os.getpid()}\\)"):
            Outbox(settings, settings.outbox_dir)
        first.close(timeout=0)
    Outbox(offline(settings), settings.outbox_dir).close(timeout=0)  # free again once closed


def test_full_outbox_blocks_put_until_kafka_drains_it(tmp_path, caplog):
    port = free_port()  # nothing listens here yet
    settings = Settings(home=tmp_path / "home", bootstrap_servers=f"127.0.0.1:{port}",
                        topics=Topics("bp"), partitions=2)
    events = steps(60, size=1000)
    outbox = Outbox(settings, max_bytes=20_000, retain="acked", fsync=False)
    done = []
    putter = threading.Thread(target=lambda: [outbox.put(ev) or done.append(ev) for ev in events], daemon=True)
    broker = None
    try:
        with caplog.at_level(logging.WARNING, logger="klong.outbox"):
            putter.start()
            deadline = time.monotonic() + 60  # the putter blocks once the spool is full, and says so
            while "outbox full" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # a put that were not blocked would go on past the bound below meanwhile
            fits = -(-20_000 // (len(encode(events[0])) + len(key_of(events[0]).encode())))  # records in 20 kB
            assert putter.is_alive() and fits - 2 <= len(done) <= fits + 3, (len(done), fits)  # then blocked
            assert "outbox full" in caplog.text and "klong sink run" in caplog.text
            broker = BrokerProcess.start(port, tmp_path / "broker.log")
            putter.join(30)
        assert not putter.is_alive() and len(done) == 60
        outbox.flush(30)
        assert sorted(ids_in(read_topics(settings, [settings.topics.rollouts]))) == sorted(e.event_id for e in events)
    finally:
        outbox.close(timeout=0)
        if broker:
            broker.stop()


def test_broker_restart_loses_nothing_the_sink_has_not_archived(tmp_path):
    port = free_port()
    broker = BrokerProcess.start(port, tmp_path / "broker.log")
    settings = Settings(home=tmp_path / "home", bootstrap_servers=broker.bootstrap, topics=Topics("rs"), partitions=2)
    ensure_topics(settings)
    topic, group = settings.topics.rollouts, settings.topics.sink_group
    outbox = Outbox(settings, retain="archived", fsync="batch")
    try:
        first, later = steps(40), steps(20, start=40)
        for ev in first:
            outbox.put(ev)
        outbox.flush(30, until="acked")

        # The sink archives a prefix of each partition and commits the next offset, as the real sink does.
        records = read_topics(settings, [topic])
        assert len(records) == 40
        commit = {p: sum(1 for r in records if r[1] == p) // 2 for p in range(2)}
        archived = {decode(v).event_id for _, p, off, _, v in records if off < commit[p]}
        sink = KafkaConsumer(**settings.kafka_config(), group_id=group, enable_auto_commit=False)
        sink.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in commit.items()})
        sink.close()
        deadline = time.monotonic() + 120  # the outbox notices the commit on its next check
        while outbox.pending() != 40 - len(archived) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert outbox.pending() == 40 - len(archived)  # archived records left the spool, the rest stay

        broker.stop()  # memory broker: every record and offset is gone
        for ev in later:
            outbox.put(ev)
        broker = BrokerProcess.start(port, tmp_path / "broker.log")

        expected = {ev.event_id for ev in first + later} - archived
        deadline, got = time.monotonic() + 180, set()  # resent after the broker is back
        while not expected <= got and time.monotonic() < deadline:
            time.sleep(0.5)
            got = set(ids_in(read_topics(settings, [topic])))
        assert expected <= got, f"{len(expected - got)} unarchived events lost by the restart"
        assert not got & archived  # archived records were not resent
        assert archived | got == {ev.event_id for ev in first + later}
        assert outbox.stats().resent == 40 - len(archived)

        # The sink archives everything in the new incarnation: the spool empties and its segments go.
        end = read_topics(settings, [topic])
        sink = KafkaConsumer(**settings.kafka_config(), group_id=group, enable_auto_commit=False)
        sink.commit({TopicPartition(topic, p): OffsetAndMetadata(1 + max(r[2] for r in end if r[1] == p), "", -1)
                     for p in {r[1] for r in end}})
        sink.close()
        outbox.flush(15, until="archived")
        assert outbox.pending() == 0
    finally:
        outbox.close(timeout=0)
        broker.stop()
