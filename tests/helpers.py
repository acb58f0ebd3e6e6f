"""Test helpers: build real events and put them on the real broker with a plain Kafka producer."""

from __future__ import annotations

import signal
import time

import numpy as np
from kafka import KafkaProducer

from schemas.arrow import encode_array
from schemas.events import (JudgeResult, JudgeResultPayload, RolloutEnded, RolloutEndedPayload, RolloutStarted,
                            RolloutStartedPayload, Step, StepPayload, encode, key_of, new_event)


def rollout_events(rollout_id: str, n_steps: int, *, task_id="task-a", group_id="g0", seed=0, end="finished",
                   tokens=(20, 200), score: float | None = 0.5):
    """A small but well-formed rollout: start, pinned system+user prefix, tool/assistant turns, judge, end."""
    rng = np.random.default_rng(seed)
    evs = [new_event(RolloutStarted, rollout_id=rollout_id,
                     payload=RolloutStartedPayload(task_id=task_id, group_id=group_id, timeout_s=7200.0))]
    for i in range(n_steps):
        role = "system" if i == 0 else "user" if i == 1 else ("assistant" if i % 2 else "tool")
        n = int(rng.integers(*tokens))
        ids = rng.integers(0, 150_000, n, dtype=np.int32)
        evs.append(new_event(Step, rollout_id=rollout_id, payload=StepPayload(
            step_idx=i, role=role, content=f"{role} step {i} " + "x" * n, token_ids=encode_array(ids, "int32"),
            logprobs=encode_array(-rng.random(n), "float32") if role == "assistant" else None,
            pinned=i < 2, elapsed_s=float(i))))
    if score is not None:
        evs.append(new_event(JudgeResult, rollout_id=rollout_id, payload=JudgeResultPayload(
            request_id=f"{rollout_id}-j", step_idx=n_steps - 1, judge_model="test", score=score, valid=True)))
    if end:
        evs.append(new_event(RolloutEnded, rollout_id=rollout_id,
                             payload=RolloutEndedPayload(status=end, n_steps=n_steps, elapsed_s=float(n_steps))))
    return evs


def produce(settings, events, raw: list[tuple[str, bytes | None, bytes]] = ()) -> None:
    """Sends events (topic by type, key by rollout) and raw (topic, key, value) messages; waits for acks."""
    producer = KafkaProducer(**settings.kafka_config(), acks="all", linger_ms=5)
    try:
        for ev in events:
            producer.send(settings.topics.for_event(ev), key=key_of(ev).encode(), value=encode(ev))
        for topic, key, value in raw:
            producer.send(topic, key=key, value=value)
        producer.flush()
    finally:
        producer.close()


def kill_sinks_repeatedly(start, n_flushes, rng, *, kills: int, random_s: tuple[float, float]) -> tuple[int, int]:
    """kill -9 sink processes from `start()` until `kills` kills, half of them after the sink archived something.
    Kills alternate: one at a random moment (`random_s`: any phase, start-up, polling, mid-flush), one that first
    waits until `n_flushes()` grows (an event, not a clock: on a loaded machine a sink may archive nothing for
    seconds) and lands a random moment later. Returns (kills, kills that followed progress)."""
    done = after_progress = 0
    while done < kills or after_progress < kills // 2:
        before = n_flushes()
        proc = start()
        if done % 2:
            deadline = time.monotonic() + 300
            while n_flushes() == before and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            time.sleep(rng.uniform(*random_s))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done += 1
        after_progress += n_flushes() > before
        assert done < 4 * kills, (done, after_progress)  # a sink that never archives: fail, don't loop
    return done, after_progress


def wait_for(what: str, cond, timeout_s: float = 180.0, poll_s: float = 0.1):
    """Returns `cond()`'s value as soon as it is true; an AssertionError naming `what` after `timeout_s` (a margin
    for a loaded machine: the wait ends on the event, not on the clock)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
