"""The rollout fleet end to end: a scheduler publishes rollout requests, three `klong rollout worker`
processes consume them as one consumer group on the real broker and run the real agent runner against
the scripted policy server; one worker is killed with SIGKILL in the middle of a rollout. Every requested
rollout ends exactly once, with all its steps (dense step_idx, no step written twice), and the killed
worker's rollout resumes on another worker from its recorded steps."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import yaml

from producers.fleet_control import ControlWriter
from rl.plan import parse_plan
from rl.scheduler import Scheduler
from store.catalog import Catalog
from tests import helpers
from tests.openai_stub import StubModel
from tests.policy_stub import PolicyStub
from tests.test_scheduler import register_tasks

ROOT = Path(__file__).resolve().parents[1]
STEP = {"tool": "bash", "args": {"cmd": "echo step >> notes.txt"}, "delay": 0.5}
SCRIPT = [{"read_paper": True}] + [STEP] * 8  # ~5 s of policy time, then end_task
WAIT_S = 240  # generous: a loaded 2-core machine; every wait below returns as soon as its event happens


def start_worker(settings, log: Path, max_rollouts: int = 4) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "klong", "rollout", "worker", "--home", str(settings.home),
                             "--bootstrap-servers", settings.bootstrap_servers, "--topic-prefix",
                             settings.topics.prefix, "--max-rollouts", str(max_rollouts)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)


wait_for = partial(helpers.wait_for, timeout_s=WAIT_S, poll_s=0.2)


def plan(policy_url: str, judge_url: str) -> dict:
    return {
        "name": "fleet", "tasks": ["ta", "tb"],
        "policy": {"base_url": policy_url, "model": "stub-policy"},
        "judge": {"base_url": judge_url, "model": "stub-judge", "concurrency": 4},
        "stages": [{"timeout": "600s", "rollouts_per_sample": 3, "iterations": 1}],
        "dataset": {"name": "fleet-rl", "config": {"max_tokens": 200000}},
        "max_concurrent_rollouts": 12, "judge_timeout": "120s",
        "agent": {"min_time_fraction": 0.0, "reminder_every_turns": 0, "sandbox": "unsafe-local"},
    }


def local_worker_logs(settings) -> list[str]:
    """The logs of the workers `Fleet` started itself (HOME/fleet/worker-<i>.log), in worker order."""
    return [f.read_text() for f in sorted((settings.home / "fleet").glob("worker-*.log"))]


def fleet_lines(text: str) -> list[str]:
    """What a worker log says about rollouts and group membership (the rest is kafka's debug output)."""
    return [ln for ln in text.splitlines()
            if "klong.fleet" in ln or re.search(r"kafka\.coordinator.* (INFO|WARNING)", ln)]


@pytest.mark.timeout(900)  # the waits inside are generous (a loaded 2-core machine)
def test_three_workers_one_killed_mid_rollout_every_rollout_ends_once_with_all_its_steps(settings, tmp_path):
    register_tasks(settings, tmp_path)
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    workers = [start_worker(settings, log) for log in logs]
    try:
        with PolicyStub(lambda rid: SCRIPT) as policy, StubModel() as judge:
            sched = Scheduler(settings, parse_plan(plan(policy.url, judge.url)), fleet=0, progress=lambda _: None)
            out: dict = {}
            run = threading.Thread(target=lambda: out.setdefault("summaries", sched.run()), daemon=True)
            run.start()

            # the victim: a worker running a rollout that has made at least 3 policy calls (mid-rollout)
            def running_mid_rollout():
                for w, log in zip(workers, logs):
                    for rid in re.findall(r"running rollout (\S+)", log.read_text()):
                        if len(policy.for_rollout(rid)) >= 3:
                            return w, rid
                return None

            victim, rid = wait_for("a worker mid-rollout", running_mid_rollout)
            calls_before = len(policy.for_rollout(rid))
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            run.join(timeout=WAIT_S * 2)
            assert not run.is_alive(), "the scheduler did not finish"
        [summary] = out["summaries"]
        assert summary.started == 6 and summary.ended == {"finished": 6}, summary

        cat = Catalog(settings)
        rows = cat.arrow("SELECT rollout_id, status, n_steps FROM rollouts").to_pylist()
        assert len(rows) == 6 and all(r["status"] == "finished" for r in rows)
        # exactly one end per rollout, and no step_idx written twice (a second writer would add other event_ids)
        assert cat.scalar("SELECT max(n) FROM (SELECT count(*) AS n FROM rollout_ended_events GROUP BY rollout_id)") == 1
        steps = cat.arrow("SELECT rollout_id, step_idx FROM steps ORDER BY rollout_id, step_idx").to_pylist()
        for r in rows:
            idx = [s["step_idx"] for s in steps if s["rollout_id"] == r["rollout_id"]]
            assert idx == list(range(r["n_steps"])), (r, idx)
        # the victim's rollout resumed on a survivor, after the steps the log held, and finished there. Each
        # resume is one a survivor logged (a loaded machine may also move a partition between the survivors)
        resumes = cat.arrow(f"SELECT next_step_idx FROM rollout_resumes WHERE rollout_id = '{rid}' "
                            "ORDER BY next_step_idx").to_pylist()
        assert resumes and resumes[0]["next_step_idx"] >= 4, resumes
        survivors = [log.read_text() for w, log in zip(workers, logs) if w is not victim]
        assert sum(text.count(f"resuming rollout {rid}") for text in survivors) == len(resumes), resumes
        assert len(policy.for_rollout(rid)) > calls_before
        # every rollout was judged (its judge request came from the worker that ended it)
        assert cat.scalar("SELECT count(DISTINCT rollout_id) FROM judge_results WHERE valid") == 6
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=120)
            except subprocess.TimeoutExpired:
                w.kill()


def test_worker_deployment_manifest(tmp_path, capsys):
    """The worker Deployment (`klong rollout deployment`): the real schema accepts it where
    kubernetes-validate is installed."""
    from klong.cli import main

    assert main(["rollout", "deployment", "--image", "registry.example/klong:1.0", "--replicas", "3",
                 "--bootstrap-servers", "kafka:9092", "--home", str(tmp_path / "home")]) == 0
    dep = yaml.safe_load(capsys.readouterr().out)
    assert dep["kind"] == "Deployment" and dep["metadata"]["name"] == "klong-rollout-worker"
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KLONG_BOOTSTRAP_SERVERS"] == "kafka:9092" and env["KLONG_HOME"] == "/data"
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["klong", "rollout", "worker"] and dep["spec"]["replicas"] == 3
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    path = tmp_path / "workers.yaml"
    path.write_text(yaml.safe_dump(dep))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    if not exe.exists():
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate): schema check skipped")
    res = subprocess.run([str(exe), "--strict", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.timeout(900)  # the waits inside are generous (a loaded 2-core machine)
def test_rl_run_with_local_workers_is_one_command(settings, tmp_path, capsys):
    """`klong rl run PLAN --workers 2`: the run starts its own workers, every rollout runs on one of them."""
    from klong.cli import main
    from tests.test_tasks import klong

    register_tasks(settings, tmp_path)
    with PolicyStub(lambda rid: [{"read_paper": True}, STEP]) as policy, StubModel() as judge:
        p = {**plan(policy.url, judge.url), "name": "local-fleet", "max_concurrent_rollouts": 4}
        p["stages"] = [{"timeout": "600s", "rollouts_per_sample": 2, "iterations": 1}]
        (tmp_path / "plan.yaml").write_text(yaml.safe_dump(p))
        assert main(klong(settings, "rl", "run", str(tmp_path / "plan.yaml"), "--workers", "2")) == 0
    out = capsys.readouterr().out
    assert "4 started, 0 carried in, 0 carried out, ended finished 4, judged 4" in out
    texts = local_worker_logs(settings)
    ran = sum((re.findall(r"running rollout (\S+)", text) for text in texts), [])
    assert len(texts) == 2 and len(policy.cursor) == 4 and set(ran) == set(policy.cursor)
    # each rollout finished on one worker. A worker that joins late (seconds on a loaded machine) takes
    # partitions over: what the first one started there was fenced there and ran again on the new owner
    done = [re.search(r"started \d+, resumed \d+, already_ended \d+, fenced (\d+), finished (\d+)", text)
            for text in texts]
    fenced, finished = (sum(int(m.group(k)) for m in done) for k in (1, 2))
    assert finished == 4 and len(ran) == 4 + fenced, (ran, fenced, finished)
    assert not list(settings.outbox_dir.glob("worker-*"))  # each worker archived and removed its outbox


@pytest.mark.timeout(900)  # the waits inside are generous (a loaded 2-core machine)
def test_partitions_moving_between_live_workers_hand_rollouts_over_without_a_second_writer(settings, tmp_path):
    """A second worker joins while the first runs 4 rollouts (the group moves partitions: the first fences
    the rollouts of those it gives away), then the first gets SIGTERM (it hands the rest over): every
    rollout resumes on the second exactly once and ends once, steps dense."""
    from concurrent.futures import wait

    from consumers.sink import Sink
    from producers.agent import AgentConfig, PolicyEndpoint, RolloutControl, run_agent
    from producers.fleet import Fleet

    register_tasks(settings, tmp_path)
    stop = threading.Event()
    sink = threading.Thread(target=Sink(settings).run, kwargs={"should_stop": stop.is_set}, daemon=True)
    sink.start()
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    workers = [start_worker(settings, logs[0])]
    long_script = [{"read_paper": True}] + [STEP] * 30
    config = AgentConfig(min_time_fraction=0.0, reminder_every_turns=0, sandbox="unsafe-local")
    try:
        with PolicyStub(lambda rid: long_script) as policy:
            fleet = Fleet(settings, run_id="handover", say=lambda _: None)
            try:
                rids = [f"0193bbbb-0000-7000-8000-00000000000{i}" for i in range(4)]
                futures = [fleet.submit(run_agent, None, settings, "ta", PolicyEndpoint(policy.url, "stub"),
                                        timeout_s=600, group_id="g-h", rollout_id=rid, control=RolloutControl(),
                                        config=config, judge=False) for rid in rids]
                wait_for("4 rollouts mid-way on the first worker",
                         lambda: all(len(policy.for_rollout(r)) >= 3 for r in rids))
                workers.append(start_worker(settings, logs[1]))
                wait_for("the second worker in the group", lambda: "assigned [" in logs[1].read_text())
                workers[0].send_signal(signal.SIGTERM)
                assert workers[0].wait(timeout=WAIT_S) == 0
                done, _ = wait(futures, timeout=WAIT_S * 2)
                assert len(done) == 4
                results = [f.result() for f in futures]
            finally:
                fleet.shutdown()
        assert all(r.status == "finished" and r.resumed for r in results)
        second = logs[1].read_text()
        assert all(second.count(f"resuming rollout {rid}") == 1 for rid in rids), second
        assert "handed over" in logs[0].read_text()
        wait_for("the ends archived", lambda: Catalog(settings).scalar(
            "SELECT count(DISTINCT rollout_id) FROM rollout_ended_events") == 4)
        cat = Catalog(settings)
        assert cat.scalar("SELECT max(n) FROM (SELECT count(*) AS n FROM rollout_ended_events GROUP BY rollout_id)") == 1
        for r in results:
            idx = [s["step_idx"] for s in cat.arrow(f"SELECT step_idx FROM steps WHERE rollout_id = '{r.rollout_id}' "
                                                     "ORDER BY step_idx").to_pylist()]
            assert idx == list(range(r.n_steps)), (r, idx)
    finally:
        stop.set()
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=120)
            except subprocess.TimeoutExpired:
                w.kill()
        sink.join(timeout=120)


@pytest.mark.timeout(900)  # the waits inside are generous (a loaded 2-core machine)
def test_a_rollout_carried_over_on_the_fleet_resumes_under_the_next_policy_version(settings, tmp_path, monkeypatch):
    """The iteration closes while a slow rollout runs on a worker: the carry-over reaches it as a command
    (rollout_resumed at its next turn, later steps under pv+1) and it counts in the next iteration."""
    register_tasks(settings, tmp_path)
    order: list[str] = []
    quick = [{"read_paper": True}, {"tool": "bash", "args": {"cmd": "echo done > result.txt"}}]
    # The slow one outlives iteration 1 on an event: its third call is answered once the carry-over command
    # was sent to the workers (not on a guess of how long the quick ones and a late-joining worker take);
    # 10 more turns (>= 5 s) let its worker read the command before it ends
    sent = threading.Event()
    slow = [{"read_paper": True}, STEP, STEP, {**STEP, "until": sent.is_set}] + [STEP] * 10
    carry_over = ControlWriter.carry_over

    def carry_over_and_tell(writer, *args, **kwargs):
        carry_over(writer, *args, **kwargs)
        sent.set()

    monkeypatch.setattr(ControlWriter, "carry_over", carry_over_and_tell)

    def script(rid: str) -> list:
        if rid not in order:
            order.append(rid)
        return slow if order.index(rid) == 0 else quick

    with PolicyStub(script) as policy, StubModel() as judge:
        p = {**plan(policy.url, judge.url), "name": "carry", "close_fraction": 0.75}
        p["stages"] = [{"timeout": "600s", "rollouts_per_sample": 2, "iterations": 2}]
        first, second = Scheduler(settings, parse_plan(p), fleet=2, progress=lambda _: None).run()
    slow_id = order[0]
    assert first.carried_out == [slow_id] and second.carried_in == 1 and second.ended == {"finished": 5}
    cat = Catalog(settings)
    resumes = cat.arrow(f"SELECT iteration, policy_version, next_step_idx FROM rollout_resumes "
                        f"WHERE rollout_id = '{slow_id}' ORDER BY next_step_idx").to_pylist()
    # One resume is the carry-over (iteration 1, pv 0 -> iteration 2, pv 1). A loaded machine may also move
    # the rollout's partition to the other worker (a late join, a missed heartbeat): that worker says so in its
    # log and resumes it from the log under the iteration and policy version it already had, never a new one
    logs = "".join(local_worker_logs(settings))
    assert len(resumes) - 1 == logs.count(f"resuming rollout {slow_id}"), (resumes, fleet_lines(logs)[-40:])
    moved = [(r["iteration"], r["policy_version"]) for r in resumes]
    carried = moved.index((2, 1))
    assert set(moved[:carried]) <= {(1, 0)} and set(moved[carried:]) == {(2, 1)}
    pvs = [r["policy_version"] for r in cat.arrow(f"SELECT policy_version FROM steps WHERE rollout_id = '{slow_id}' "
                                                   "ORDER BY step_idx").to_pylist()]
    cut = resumes[carried]["next_step_idx"]
    assert 0 < cut < len(pvs) and set(pvs[:cut]) == {0} and set(pvs[cut:]) == {1}
    assert len({r["next_step_idx"] for r in resumes}) == len(resumes)  # no two resumes at one step
    row = cat.arrow(f"SELECT status, last_iteration FROM rollouts WHERE rollout_id = '{slow_id}'").to_pylist()
    assert row == [{"status": "finished", "last_iteration": 2}]
