"""A fleet worker and the log: a rollout another worker left mid-way resumes with the same context at the
next step_idx; a request delivered again after its rollout ended runs nothing (exactly once per rollout
id); commands and messages are checked; a fenced rollout records nothing more."""

from __future__ import annotations

import threading
import time

import pytest

from consumers.sink import Sink
from producers.agent import AgentConfig, PolicyEndpoint, RolloutControl, run_agent
from producers.fleet import Fleet
from producers.fleet_log import config_from_dict, config_to_dict
from producers.outbox import Outbox
from producers.recorder import RolloutRecorder
from producers.fleet_jobs import Fenced, FencedOutbox
from producers.rollout_worker import RolloutWorker
from producers.sandbox import SandboxLimits
from schemas.errors import ConfigError, ValidationError
from schemas.events import RolloutStarted, new_event, RolloutStartedPayload
from schemas.fleet import RolloutRequest, decode_message, encode_message
from store.catalog import Catalog
from tests.helpers import wait_for
from tests.policy_stub import PolicyStub
from tests.test_scheduler import register_tasks

CONFIG = AgentConfig(prompt="inline", min_time_fraction=0.0, reminder_every_turns=0, sandbox="unsafe-local")
WAIT_S = 180


def test_agent_config_travels_in_a_request_and_bad_messages_are_refused():
    cfg = AgentConfig(limits=SandboxLimits(tool_timeout_s=5, memory_mb=512), allow_hosts=("pypi.org",), seed=3)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_dict({**config_to_dict(cfg), "warp_drive": True})
    req = RolloutRequest(rollout_id="r-1", task_id="ta", group_id="g", timeout_s=60, base_url="http://x/v1", model="m")
    assert decode_message(encode_message(req), RolloutRequest) == req
    with pytest.raises(ValidationError, match="not a valid RolloutRequest"):
        decode_message(b'{"rollout_id": "r-1"}', RolloutRequest)
    with pytest.raises(ValidationError, match="newer than this worker"):
        decode_message(encode_message(RolloutRequest(**{**{f: getattr(req, f) for f in req.__struct_fields__},
                                                        "schema_version": 99})), RolloutRequest)


def test_a_fenced_rollout_puts_nothing_more(settings):
    with Outbox(settings, settings.outbox_dir / "fenced", retain="acked") as outbox:
        fenced = FencedOutbox(outbox)
        ev = new_event(RolloutStarted, rollout_id="r-1", payload=RolloutStartedPayload(
            task_id="ta", group_id="g", timeout_s=60))
        fenced.put(ev)
        fenced.fence()
        with pytest.raises(Fenced):
            fenced.put(ev)
        outbox.flush(timeout=60, until="acked")
        assert outbox.stats().sent == 1


@pytest.mark.timeout(600)
def test_worker_resumes_a_lost_rollout_from_the_log_and_never_runs_an_ended_one_again(settings, tmp_path):
    register_tasks(settings, tmp_path)
    stop = threading.Event()
    sink = Sink(settings)
    threads = [threading.Thread(target=sink.run, kwargs={"should_stop": stop.is_set}, daemon=True)]
    worker = RolloutWorker(settings, max_rollouts=2, say=lambda _: None)
    threads.append(threading.Thread(target=worker.run, kwargs={"should_stop": stop.is_set}, daemon=True))
    # a rollout a lost worker left: the prefix, one turn, and a tool call whose output never got recorded
    rid = "0193aaaa-0000-7000-8000-000000000001"
    with Outbox(settings, settings.outbox_dir / "lost-worker", retain="acked") as outbox:
        rec = RolloutRecorder(outbox, task_id="ta", group_id="g-lost", timeout_s=300, rollout_id=rid, iteration=2,
                              policy_version=2)
        rec.observation("You are an agent.", role="system", pinned=True)
        rec.observation("Do the task.", role="user", pinned=True)
        rec.action("Listing.", tool_call=("bash", '{"cmd": "ls"}'))
        rec.observation("notes.txt", role="tool", tool_call_id="call-a")
        rec.action("Writing.", tool_call=("bash", '{"cmd": "echo x > y"}'))
        outbox.flush(timeout=60, until="acked")
    for t in threads:
        t.start()
    try:
        with PolicyStub([{"tool": "bash", "args": {"cmd": "cat y"}}]) as policy:
            fleet = Fleet(settings, run_id="t", say=lambda _: None)
            try:
                submit = lambda: fleet.submit(  # noqa: E731
                    run_agent, None, settings, "ta", PolicyEndpoint(policy.url, "stub"), timeout_s=300,
                    group_id="g-lost", iteration=2, policy_version=2, rollout_id=rid, control=RolloutControl(),
                    config=CONFIG)
                res = submit().result(timeout=WAIT_S)
                assert (res.status, res.resumed, res.iteration) == ("finished", True, 2)
                first = policy.for_rollout(rid)[0].messages
                assert [m["role"] for m in first] == ["system", "user", "assistant", "tool", "assistant", "tool"]
                assert [m["content"] for m in first[:5]] == ["You are an agent.", "Do the task.", "Listing.",
                                                            "notes.txt", "Writing."]
                assert first[3]["tool_call_id"] == first[2]["tool_calls"][0]["id"] == "call-a"
                assert "worker was lost" in first[5]["content"]
                calls = len(policy.requests)

                # the same request again (Kafka redelivery): the log says it ended, nothing runs
                again = submit().result(timeout=WAIT_S)
                assert (again.status, again.n_steps) == ("finished", res.n_steps) and len(policy.requests) == calls
            finally:
                fleet.shutdown()
        cat = Catalog(settings)
        wait_for("the end archived", lambda: Catalog(settings).scalar(
            f"SELECT count(*) FROM rollout_ended_events WHERE rollout_id = '{rid}'") == 1)
        idx = [r["step_idx"] for r in cat.arrow(f"SELECT step_idx FROM steps WHERE rollout_id = '{rid}' "
                                                 "ORDER BY step_idx").to_pylist()]
        assert idx == list(range(res.n_steps)) and res.n_steps >= 8
        assert cat.arrow(f"SELECT iteration, policy_version, next_step_idx FROM rollout_resumes "
                         f"WHERE rollout_id = '{rid}'").to_pylist() == [
            {"iteration": 2, "policy_version": 2, "next_step_idx": 5}]
        assert worker.stats["resumed"] == 1 and worker.stats["already_ended"] == 1 and worker.stats["started"] == 0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)


def test_token_context_is_rebuilt_from_recorded_ids_and_cut_where_the_last_step_was_produced(settings, tmp_path):
    """Token-in/token-out: the recorded ids rejoin the context as they were; a prune before the loss
    (context_start of the last step) is applied again, the pinned prefix kept."""
    import numpy as np

    from producers.agent_config import RolloutControl
    from producers.agent_context import TokenContext
    from producers.agent_loop import AgentLoop
    from producers.agent_tools import TOOLS
    from producers.fleet_log import ResumePoint
    from producers.fleet_resume import restore
    from producers.sandbox import SubprocessSandbox

    def row(i, role, ids, pinned=False, context_start=None, call=None, call_id=None):
        return {"step_idx": i, "role": role, "content": f"{role} {i}", "tool_call": call, "tool_call_id": call_id,
                "pinned": pinned, "elapsed_s": 1.5 * i, "context_start": context_start, "token_ids": ids}

    steps = [row(0, "system", [1, 2], True), row(1, "user", [3], True),
             row(2, "assistant", [4, 5], call={"name": "bash", "arguments": "{}", "id": None}),
             row(3, "tool", [6], call_id="c1"),
             row(4, "assistant", [7, 8], context_start=2, call={"name": "bash", "arguments": "{}", "id": None}),
             row(5, "tool", [9], call_id="c2"),
             row(6, "assistant", [10], context_start=4, call={"name": "bash", "arguments": "{}", "id": None}),
             row(7, "tool", [11, 12], call_id="c3")]
    with Outbox(settings, settings.outbox_dir / "tok", retain="acked") as outbox:
        rec = RolloutRecorder(outbox, task_id="ta", group_id="g", timeout_s=60, rollout_id="r-tok", next_step_idx=8)
        loop = AgentLoop(rec, SubprocessSandbox(tmp_path / "sb"), None, RolloutControl(), CONFIG, 60.0, None)
        loop.ctx = TokenContext(chat=None, tools=TOOLS)  # the ids are restored as recorded: no template needed
        before = time.monotonic()
        restore(loop, ResumePoint(steps, iteration=1, policy_version=1, stage=1))
    assert loop.ctx.n_prefix == 2 and loop.ctx.steps == [0, 1, 4, 5, 6, 7]
    assert loop.ctx.prompt_ids == [1, 2, 3, 7, 8, 9, 10, 11, 12]
    assert loop.ctx.context_start(8) == 4 and loop.turns == 3
    # the clock restarts at the last step's elapsed time (10.5 s of 60): what is left is that, less the time
    # this test has run since the restore (seconds on a loaded machine)
    left, since = loop.left(), time.monotonic() - before
    assert 60.0 - 10.5 - since - 0.01 <= left <= 60.0 - 10.5 + 0.01
    assert all(isinstance(x, np.ndarray) for x in loop.ctx.ids)


@pytest.mark.timeout(600)
def test_a_log_that_cannot_be_resumed_ends_the_rollout_error_with_the_reason(settings, tmp_path):
    register_tasks(settings, tmp_path)
    rid = "0193cccc-0000-7000-8000-000000000001"
    with Outbox(settings, settings.outbox_dir / "gap", retain="acked") as outbox:
        rec = RolloutRecorder(outbox, task_id="ta", group_id="g-gap", timeout_s=300, rollout_id=rid)
        rec.observation("You are an agent.", role="system", pinned=True)
        rec.observation("Do the task.", role="user", pinned=True)
        later = RolloutRecorder.from_existing(outbox, rollout_id=rid, next_step_idx=3, iteration=0, policy_version=0,
                                              task_id="ta", group_id="g-gap", timeout_s=300)
        later.observation("a step after a gap", role="user")  # step 2 never recorded
        outbox.flush(timeout=60, until="acked")
    stop = threading.Event()
    worker = RolloutWorker(settings, max_rollouts=1, say=lambda _: None)
    threads = [threading.Thread(target=Sink(settings).run, kwargs={"should_stop": stop.is_set}, daemon=True),
               threading.Thread(target=worker.run, kwargs={"should_stop": stop.is_set}, daemon=True)]
    for t in threads:
        t.start()
    try:
        with PolicyStub([]) as policy:
            fleet = Fleet(settings, run_id="t", say=lambda _: None)
            try:
                res = fleet.submit(run_agent, None, settings, "ta", PolicyEndpoint(policy.url, "stub"), timeout_s=300,
                                   group_id="g-gap", rollout_id=rid, control=RolloutControl(),
                                   config=CONFIG).result(timeout=WAIT_S)
            finally:
                fleet.shutdown()
            assert not policy.requests
        assert (res.status, res.n_steps) == ("error", 4) and "not dense" in res.error, res
        wait_for("the end archived", lambda: Catalog(settings).scalar(
            f"SELECT count(*) FROM rollout_ended_events WHERE rollout_id = '{rid}'") == 1)
        ended = Catalog(settings).arrow(f"SELECT status, n_steps, error FROM rollout_ended_events "
                                        f"WHERE rollout_id = '{rid}'").to_pylist()
        assert ended[0]["status"] == "error" and "worker lost mid-rollout" in ended[0]["error"]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)


def test_commands_reach_a_rollout_attached_later_and_served_is_scoped_to_its_run(settings):
    from kafka import KafkaProducer

    from producers.fleet import ensure_fleet_topics
    from producers.fleet_control import ControlReader, ControlWriter

    ensure_fleet_topics(settings)
    producer = KafkaProducer(**settings.kafka_config(), acks="all")
    mine, other = ControlWriter(settings, producer, "run-a"), ControlWriter(settings, producer, "run-b")
    mine.carry_over("r-1", iteration=2, policy_version=2, wait_served=True)
    mine.stop("r-2")
    reader = ControlReader(settings)
    reader.start()  # returns once it read the topic up to its end: both commands are known
    try:
        carried, stopped = RolloutControl(iteration=1, policy_version=1), RolloutControl()
        reader.attach("r-1", carried)
        reader.attach("r-2", stopped)
        assert stopped.stopped and not carried.stopped
        assert carried._take()[:2] == (2, 2)
        other.served(2)  # another run's policy version 2: not ours
        mine.served(3)
        other.served(99)  # a marker with the same key ("*": one partition, read in order after the two above)
        wait_for("the marker", lambda: ("run-b", 99) in reader._served and reader._served[("run-b", 99)].is_set())
        assert not carried._served.is_set()
        mine.served(2)
        wait_for("served(2) of this run", carried._served.is_set)
    finally:
        reader.stop()
        producer.close()
