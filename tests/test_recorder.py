"""The rollout recorder SDK, read back from the real broker."""

from __future__ import annotations

import time

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from producers.outbox import Outbox
from producers.recorder import RolloutRecorder, publish
from schemas.arrow import decode_array
from schemas.claimcheck import BlobStore, resolve_claim
from schemas.errors import ValidationError
from schemas.events import (JudgeResult, JudgeResultPayload, RolloutEnded, RolloutResumed, RolloutStarted, Snapshot,
                            Step, ToolCall, decode, new_event)


def rollout_events(settings, rollout_id: str, topic: str | None = None) -> list:
    """The events of one rollout in log order (one partition per rollout), via assign + seek."""
    consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False)
    try:
        topic = topic or settings.topics.rollouts
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        end, out = consumer.end_offsets(tps), []
        deadline = time.monotonic() + 120  # returns at the end offsets; the margin is for a loaded machine
        while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for msgs in consumer.poll(200).values():
                out.extend(m for m in msgs if m.key == rollout_id.encode())
        return [decode(m.value) for m in sorted(out, key=lambda m: m.offset)]
    finally:
        consumer.close()


@pytest.fixture
def outbox(settings):
    with Outbox(settings, retain="acked", fsync="batch") as ob:
        yield ob


def test_steps_are_dense_pinned_and_tokens_round_trip(settings, outbox):
    rng = np.random.default_rng(0)
    paper_ids = rng.integers(0, 150_000, 3000, dtype=np.int64)  # numpy, not int32: the SDK converts
    act_ids = [5, 6, 7, 8]
    act_lps = np.array([-0.1, -0.2, -1.5, -0.01])
    with RolloutRecorder(outbox, task_id="t1", group_id="g1", timeout_s=7200, stage=2, iteration=3,
                         policy_version=4, scaffold="basic-agent", model="tiny") as rec:
        idx = [rec.observation("You are an agent.", role="system", pinned=True),
               rec.observation("Reproduce the paper.", role="user", pinned=True),
               rec.action("read it", tool_call=("read_file_chunk", {"path": "paper.md"}), token_ids=act_ids,
                          logprobs=act_lps, pinned=True),
               rec.observation("# Paper ...", token_ids=paper_ids, pinned=True, tool_call_id="c1")]
        for k in range(5):
            idx.append(rec.action(f"run {k}", tool_call=ToolCall(name="bash", arguments='{"cmd": "ls"}'),
                                  token_ids=[1, 2], logprobs=[-0.5, -0.25]))
            idx.append(rec.observation(f"out {k}", token_ids=[3]))
        assert rec.snapshot("sha256:" + "a" * 64, n_files=3, n_bytes=100) == 13
    outbox.flush(30)

    evs = rollout_events(settings, rec.rollout_id)
    assert idx == list(range(14))
    assert isinstance(evs[0], RolloutStarted) and isinstance(evs[-1], RolloutEnded)
    started = evs[0].payload
    assert (started.task_id, started.group_id, started.stage, started.iteration, started.policy_version,
            started.timeout_s, started.scaffold) == ("t1", "g1", 2, 3, 4, 7200, "basic-agent")
    st = [e.payload for e in evs if isinstance(e, Step)]
    assert [s.step_idx for s in st] == list(range(14))
    assert [s.pinned for s in st] == [True] * 4 + [False] * 10
    assert [s.role for s in st[:4]] == ["system", "user", "assistant", "tool"]
    assert st[2].tool_call == ToolCall(name="read_file_chunk", arguments='{"path": "paper.md"}')
    np.testing.assert_array_equal(decode_array(st[3].token_ids, "int32"), paper_ids)
    np.testing.assert_array_equal(decode_array(st[2].token_ids, "int32"), act_ids)
    np.testing.assert_array_equal(decode_array(st[2].logprobs, "float32"), act_lps.astype(np.float32))
    assert st[0].token_ids is None and all(s.policy_version == 4 for s in st)
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(st, st[1:]))
    snap = next(e.payload for e in evs if isinstance(e, Snapshot))
    assert (snap.step_idx, snap.n_files) == (13, 3)
    assert (evs[-1].payload.status, evs[-1].payload.n_steps) == ("finished", 14)


def test_exception_ends_the_rollout_with_error(settings, outbox):
    with pytest.raises(RuntimeError, match="sandbox died"):
        with RolloutRecorder(outbox, task_id="t1", group_id="g1", timeout_s=60) as rec:
            rec.action("try", token_ids=[1], logprobs=[-1.0])
            raise RuntimeError("sandbox died")
    outbox.flush(30)
    ended = rollout_events(settings, rec.rollout_id)[-1]
    assert isinstance(ended, RolloutEnded)
    assert ended.payload.status == "error" and "sandbox died" in ended.payload.error
    assert ended.payload.n_steps == 1


def test_explicit_end_status_and_no_steps_after_end(settings, outbox):
    with RolloutRecorder(outbox, task_id="t1", group_id="g1", timeout_s=60) as rec:
        rec.observation("task", role="user")
        rec.end("timeout", elapsed_s=60.0)
        with pytest.raises(ValidationError, match="already ended"):
            rec.action("late")
    outbox.flush(30)
    ends = [e for e in rollout_events(settings, rec.rollout_id) if isinstance(e, RolloutEnded)]
    assert [(e.payload.status, e.payload.elapsed_s) for e in ends] == [("timeout", 60.0)]


def test_bad_arguments_are_rejected_with_a_clear_message(outbox):
    rec = RolloutRecorder(outbox, task_id="t1", group_id="g1", timeout_s=60)
    with pytest.raises(ValidationError, match="3 logprobs for 2 token_ids"):
        rec.action("x", token_ids=[1, 2], logprobs=[-1.0, -1.0, -1.0])
    with pytest.raises(ValidationError, match="logprobs need the token_ids"):
        rec.action("x", logprobs=[-1.0])
    with pytest.raises(ValidationError, match="logprobs belong on assistant steps"):
        rec.observation("x", token_ids=[1], logprobs=[-1.0])
    with pytest.raises(ValidationError, match="not 'assistant'"):
        rec.observation("x", role="assistant")
    with pytest.raises(ValidationError, match=r"\[0, 2\*\*31\)"):
        rec.observation("x", token_ids=[-1, 4])
    with pytest.raises(ValidationError, match="tool_call must be"):
        rec.action("x", tool_call="bash")
    assert rec.observation("fine") == 0  # the rejected calls used no step_idx


def test_resumed_rollout_continues_its_step_idx(settings, outbox):
    first = RolloutRecorder(outbox, task_id="t1", group_id="g1", timeout_s=600)
    first.start()
    for _ in range(3):
        first.action("a", token_ids=[1], logprobs=[-0.1])
    # Iteration over: the rollout is carried over, maybe into another process, under a new policy.
    with RolloutRecorder.from_existing(outbox, rollout_id=first.rollout_id, next_step_idx=first.n_steps,
                                       iteration=1, policy_version=2, task_id="t1", group_id="g1",
                                       timeout_s=600, elapsed_offset_s=100.0) as rec:
        assert rec.action("b") == 3
        rec.resume(iteration=2, policy_version=3)
        assert rec.observation("c") == 4
    outbox.flush(30)
    evs = rollout_events(settings, first.rollout_id)
    assert [type(e).__name__ for e in evs] == ["RolloutStarted", "Step", "Step", "Step", "RolloutResumed", "Step",
                                               "RolloutResumed", "Step", "RolloutEnded"]
    resumed = [e.payload for e in evs if isinstance(e, RolloutResumed)]
    assert [(r.iteration, r.policy_version, r.next_step_idx) for r in resumed] == [(1, 2, 3), (2, 3, 4)]
    st = [e.payload for e in evs if isinstance(e, Step)]
    assert [(s.step_idx, s.policy_version) for s in st] == [(0, 0), (1, 0), (2, 0), (3, 2), (4, 3)]
    assert st[3].elapsed_s >= 100.0 and evs[-1].payload.n_steps == 5


def test_large_observation_goes_by_claim_check_and_publish_sends_other_events(settings, outbox):
    big = "z" * 1_500_000
    with RolloutRecorder(outbox, task_id="t1", group_id="g1", timeout_s=60) as rec:
        rec.observation(big, token_ids=np.arange(300_000))
        publish(outbox, new_event(JudgeResult, rollout_id=rec.rollout_id, payload=JudgeResultPayload(
            request_id="q1", step_idx=0, judge_model="j", score=0.5, valid=True)))
    outbox.flush(30)
    step = next(e for e in rollout_events(settings, rec.rollout_id) if isinstance(e, Step))
    assert step.payload.blob_ref and step.payload.content == ""
    whole = resolve_claim(step, BlobStore(settings.blob_dir))
    assert whole.payload.content == big
    np.testing.assert_array_equal(decode_array(whole.payload.token_ids, "int32"), np.arange(300_000))
    (judged,) = rollout_events(settings, rec.rollout_id, settings.topics.judge_results)
    assert judged.payload.score == 0.5


def test_request_judgment_goes_to_the_priority_topic(settings, outbox):
    from kafka import KafkaConsumer, TopicPartition

    from schemas.events import decode

    with RolloutRecorder(outbox, task_id="t", group_id="g", timeout_s=60) as rec:
        rec.action("done", token_ids=[1], logprobs=[-0.1])
        train_id = rec.request_judgment()
        eval_id = rec.request_judgment(priority="eval", snapshot_ref="sha256:" + "0" * 64)
    outbox.flush(timeout=30, until="acked")
    got = {}
    for topic in (settings.topics.judge_train, settings.topics.judge_eval):
        consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, consumer_timeout_ms=2000)
        consumer.assign([TopicPartition(topic, p) for p in range(settings.partitions)])
        consumer.seek_to_beginning()
        got[topic] = [decode(m.value).payload for m in consumer]
        consumer.close()
    assert [(p.request_id, p.step_idx, p.priority) for p in got[settings.topics.judge_train]] == [(train_id, 0, "train")]
    assert [(p.request_id, p.snapshot_ref is not None) for p in got[settings.topics.judge_eval]] == [(eval_id, True)]
