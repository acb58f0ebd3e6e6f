"""The rollout simulator, through the real outbox and broker: deterministic, counted, KLong-shaped."""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict

import msgspec
import pytest
from kafka import KafkaConsumer, TopicPartition

from services.broker import ensure_topics
from core.settings import Settings, Topics
from producers.outbox import Outbox
from producers.simulate import TIMEOUT_S, VOCAB_SIZE, simulate
from schemas.arrow import decode_array
from schemas.claimcheck import BlobStore
from schemas.events import decode

SMALL = dict(rollouts=4, turns=(45, 60), tasks=2, group_size=2, running_fraction=0.25, timeout_fraction=0.25)


def read_all(settings) -> list[tuple[str, int, int, object]]:
    """(topic, partition, offset, event) for every event on the settings' topics, via assign + seek."""
    consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False)
    try:
        tps = [TopicPartition(t, p) for t in settings.topics.all() for p in consumer.partitions_for_topic(t)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        end, out = consumer.end_offsets(tps), []
        deadline = time.monotonic() + 120  # returns at the end offsets; the margin is for a loaded machine
        while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for msgs in consumer.poll(200).values():
                out.extend((m.topic, m.partition, m.offset, decode(m.value)) for m in msgs)
        return out
    finally:
        consumer.close()


def run(settings, seed: int):
    with Outbox(settings, retain="acked", fsync="batch") as outbox:
        seen = []
        summary = simulate(outbox, seed=seed, progress=seen.append, **SMALL)
        outbox.flush(60)
    assert seen and seen[-1] == summary.events
    return summary, read_all(settings)


def canonical(records) -> list[tuple]:
    """Event types and payloads in emission order, ids masked (fresh per run by design)."""
    starts = sorted((ev.produced_at, ev.rollout_id) for *_, ev in records if type(ev).__name__ == "RolloutStarted")
    order = {rid: i for i, (_, rid) in enumerate(starts)}
    # Per-rollout order is the log order within its partition; rollouts are ordered by start time.
    ranked = sorted(records, key=lambda r: (order.get(r[3].rollout_id, -1), r[0], r[1], r[2]))
    out = []
    for *_, ev in ranked:
        payload = msgspec.to_builtins(ev.payload)
        for masked in ("group_id", "request_id"):
            payload.pop(masked, None)
        out.append((type(ev).__name__, msgspec.json.encode(payload)))
    return out


@pytest.fixture(scope="module")
def runs(broker, tmp_path_factory):
    """Two runs with seed 7 and one with seed 8, each on its own topics and home."""
    out = []
    for seed in (7, 7, 8):
        settings = Settings(home=tmp_path_factory.mktemp("sim"), bootstrap_servers=broker.bootstrap,
                            topics=Topics(f"s{uuid.uuid4().hex[:10]}"), partitions=2)
        ensure_topics(settings)
        out.append((settings, *run(settings, seed)))
    return out


def test_same_seed_gives_same_contents(runs):
    (_, sa, a), (_, sb, b), (_, sc, c) = runs
    assert sa == sb
    assert canonical(a) == canonical(b)
    assert canonical(a) != canonical(c)
    assert {ev.event_id for *_, ev in a}.isdisjoint(ev.event_id for *_, ev in b)


def test_counts_match_the_summary(runs):
    _, summary, records = runs[0]
    by_type = Counter(type(ev).__name__ for *_, ev in records)
    assert len(records) == summary.events
    assert summary.events_by_type == {
        "task_registered": by_type["TaskRegistered"], "rollout_started": by_type["RolloutStarted"],
        "step": by_type["Step"], "snapshot": by_type["Snapshot"], "judge_requested": by_type["JudgeRequested"],
        "judge_result": by_type["JudgeResult"], "rollout_ended": by_type["RolloutEnded"]}
    assert summary.steps == by_type["Step"] and summary.rollouts == by_type["RolloutStarted"] == 4
    assert summary.tasks == by_type["TaskRegistered"] == 3 and summary.tasks_by_split == {"train": 2, "eval": 1}
    ended = Counter(ev.payload.status for *_, ev in records if type(ev).__name__ == "RolloutEnded")
    assert dict(ended) == {k: v for k, v in summary.rollouts_by_status.items() if k != "running"}
    assert summary.rollouts_by_status["running"] == 1 and by_type["RolloutEnded"] == 3
    tokens = sum(len(decode_array(ev.payload.token_ids, "int32")) for *_, ev in records
                 if type(ev).__name__ == "Step")
    assert tokens == summary.tokens


def test_rollouts_are_klong_shaped(runs):
    settings, _, records = runs[0]
    by_rollout = defaultdict(list)
    for topic, _, offset, ev in records:
        if topic == settings.topics.rollouts:
            by_rollout[ev.rollout_id].append((offset, ev))
    tasks = {ev.payload.task_id: ev.payload for *_, ev in records if type(ev).__name__ == "TaskRegistered"}
    assert {t.split for t in tasks.values()} == {"train", "eval"}
    leaf = tasks[next(iter(tasks))].rubric["sub_tasks"][0]["sub_tasks"][0]
    assert {"id", "requirements", "weight", "sub_tasks", "task_category"} <= set(leaf)
    groups = Counter()
    for rid, evs in by_rollout.items():
        evs = [ev for _, ev in sorted(evs, key=lambda x: x[0])]
        assert type(evs[0]).__name__ == "RolloutStarted" and evs[0].payload.timeout_s == TIMEOUT_S
        groups[evs[0].payload.group_id] += 1
        steps = [ev.payload for ev in evs if type(ev).__name__ == "Step"]
        assert [s.step_idx for s in steps] == list(range(len(steps)))
        pinned = [s.pinned for s in steps]
        n_prefix = pinned.index(False)
        assert n_prefix >= 6 and not any(pinned[n_prefix:])  # pinned steps come first, then none
        assert [s.role for s in steps[:2]] == ["system", "user"]
        assert all(2000 <= len(decode_array(s.token_ids, "int32")) <= 6000 for s in steps[3:n_prefix:2])
        for s in steps:
            ids = decode_array(s.token_ids, "int32")
            assert 0 <= ids.min() and ids.max() < VOCAB_SIZE
            if s.role == "assistant":
                assert len(decode_array(s.logprobs, "float32")) == len(ids) and s.tool_call is not None
            else:
                assert s.logprobs is None
        elapsed = [s.elapsed_s for s in steps]
        assert elapsed == sorted(elapsed) and elapsed[-1] <= TIMEOUT_S
        if type(evs[-1]).__name__ == "RolloutEnded":
            assert evs[-1].payload.n_steps == len(steps)
            assert (evs[-1].payload.status == "timeout") == (evs[-1].payload.elapsed_s == TIMEOUT_S)
    assert sorted(groups.values()) == [2, 2]

    # Every snapshot names a real blob and has one judge request and one result.
    store = BlobStore(settings.blob_dir)
    snaps = [ev for *_, ev in records if type(ev).__name__ == "Snapshot"]
    assert snaps and all(store.get(s.payload.ref) for s in snaps)
    requests = [ev.payload for *_, ev in records if type(ev).__name__ == "JudgeRequested"]
    results = {ev.payload.request_id: ev.payload for *_, ev in records if type(ev).__name__ == "JudgeResult"}
    assert len(requests) == len(snaps) == len(results)
    for req in requests:
        res = results[req.request_id]
        assert req.priority == ("eval" if tasks[req.task_id].split == "eval" else "train")
        assert res.step_idx == req.step_idx and (res.score is None) == (not res.valid)
        assert res.score is None or 0 <= res.score <= 1
