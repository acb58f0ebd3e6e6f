"""No poison pills: 1,000 fuzzed messages, the known poison pills among them, through the real broker
into the running sink; every valid event is archived, every other message is a dead letter with its
error, and nothing stops the sink. The SDK refuses the same values before they are sent."""

from __future__ import annotations

import json
import random
import threading

import pytest

from consumers.sink import Sink
from schemas.errors import ValidationError
from schemas.events import (MAX_INT64, MAX_JSON_DEPTH, Step, StepPayload, TaskPayload, TaskRegistered,
                            TrainingRun, TrainingRunPayload, encode, key_of, new_event)
from store.catalog import Catalog
from tests.helpers import produce, rollout_events


def _deep(n: int) -> object:
    v: object = []
    for _ in range(n):
        v = [v]
    return v


def _poison(rng: random.Random, base: dict) -> bytes:
    """One message a careless or hostile producer could send."""
    doc = json.loads(json.dumps(base))
    kind = rng.randrange(12)
    if kind == 0:
        doc["payload"]["step_idx"] = rng.choice([2**63, 2**64 + 7, -1, 10**30])
    elif kind == 1:
        doc["payload"]["content"] = rng.choice([None, 5, ["x"], {"a": 1}])
    elif kind == 2:
        return b"[" * 5000 + b"]" * 5000
    elif kind == 3:
        return _deep_json_message(rng.choice([MAX_JSON_DEPTH + 1, 5000]))
    elif kind == 4:
        return rng.randbytes(rng.randrange(1, 200))
    elif kind == 5:
        raw = json.dumps(doc).encode()
        return raw[: rng.randrange(1, len(raw))]
    elif kind == 6:
        doc["event_type"] = rng.choice(["nope", "", 7, None])
    elif kind == 7:
        doc["payload"]["token_ids"] = rng.choice(["!!notbase64", [1, -5], [2**40], "QUJD"])
    elif kind == 8:
        doc["schema_version"] = rng.choice([2**40, 0, 99])
    elif kind == 9:
        doc["payload"]["elapsed_s"] = rng.choice([-1.0, "soon", 1e400])
    elif kind == 10:
        doc["produced_at"] = rng.choice(["yesterday", 12, "2024-13-45T00:00:00Z"])
    else:
        return b""
    return json.dumps(doc, allow_nan=True).encode()


def _deep_json_message(n: int = 5000) -> bytes:
    """A task whose rubric (free-form JSON) is an array nested n deep (built as text: json.dumps would recurse)."""
    ev = new_event(TaskRegistered, payload=TaskPayload(task_id="deep", title="t", split="train", rubric=[]))
    raw = encode(ev).decode()
    assert '"rubric":[]' in raw
    return raw.replace('"rubric":[]', '"rubric":' + "[" * n + "]" * n).encode()


def test_sdk_refuses_out_of_range_and_too_deep():
    with pytest.raises(ValidationError, match="step_idx"):
        new_event(Step, rollout_id="r", payload=StepPayload(step_idx=2**63, role="user"))
    assert new_event(Step, rollout_id="r", payload=StepPayload(step_idx=MAX_INT64, role="user"))
    with pytest.raises((ValidationError, ValueError), match="deep"):  # ValueError: the payload's constructor
        new_event(TrainingRun, payload=TrainingRunPayload(run_id="x", phase="started", config=_deep(MAX_JSON_DEPTH + 1)))
    with pytest.raises((ValidationError, ValueError), match="deep"):
        new_event(TaskRegistered, payload=TaskPayload(task_id="t", title="t", split="train",
                                                      rubric={"sub_tasks": _deep(1000)}))


def test_fuzzed_messages_never_stop_the_sink(settings):
    rng = random.Random(1234)
    valid = [ev for r in range(40) for ev in rollout_events(f"ok-{r}", 8, seed=r)]  # 40 x 11 = 440 valid events
    base = json.loads(encode(valid[1]))
    topic = settings.topics.rollouts
    n_fuzz = 1000 - len(valid) - 5
    raw = [(topic, b"fuzz", _poison(rng, base)) for _ in range(n_fuzz)]
    # the two pills, by hand: an int64 overflow (OverflowError in Arrow before) and 5,000-deep nesting
    big = json.loads(encode(valid[2]))
    big["payload"]["step_idx"] = 9223372036854775808
    raw += [(topic, b"pill", json.dumps(big).encode()), (topic, b"pill", _deep_json_message()),
            (topic, b"pill", b"[" * 5000 + b"]" * 5000), (topic, None, b"{}"), (topic, b"pill", b"\xff\xfe")]
    order = [("ev", ev) for ev in valid] + [("raw", m) for m in raw]
    rng.shuffle(order)
    assert len(order) == 1000
    # the sink is up while the messages arrive; it stops once it has read all 1,000 and gone idle
    sink = Sink(settings, flush_interval_s=0.2)
    seen = threading.Event()
    result: dict = {}

    def run_sink():
        result["stats"] = sink.run(should_stop=seen.is_set,
                                   progress=lambda st: st.events + st.dead_letters >= 1000 and seen.set())

    thread = threading.Thread(target=run_sink, daemon=True)
    thread.start()
    produce(settings, [], raw=[(settings.topics.for_event(x), key_of(x).encode(), encode(x)) if k == "ev" else x
                               for k, x in order])
    thread.join(timeout=300)
    assert not thread.is_alive() and "stats" in result, "the sink stopped reading (a poison pill?)"
    stats = result["stats"]
    cat = Catalog(settings)
    archived = set(cat.arrow("SELECT event_id FROM rollout_started_events UNION ALL SELECT event_id FROM step_events "
                             "UNION ALL SELECT event_id FROM rollout_ended_events UNION ALL "
                             "SELECT event_id FROM judge_result_events").column(0).to_pylist())
    assert {ev.event_id for ev in valid} <= archived  # every valid event archived
    dead = cat.arrow("SELECT \"offset\", error, error_kind FROM dead_letters").to_pylist()
    assert stats.events + stats.dead_letters == 1000 and len(dead) == stats.dead_letters >= n_fuzz * 0.8
    assert all(d["error"] for d in dead)
    errors = " | ".join(d["error"] for d in dead)
    assert "9223372036854775807" in errors and "deep" in errors
    # a second sink over the same topics finds nothing left to do: no flush failed, nothing to re-read
    assert Sink(settings).run(until_idle=True).events == 0
