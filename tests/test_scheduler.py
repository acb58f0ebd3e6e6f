"""The progressive-RL scheduler end to end: `klong rl run` of a two-stage plan on the real broker, driving
the real agent runner (producers.agent) against the scripted policy server (tests.policy_stub), with the
judge worker grading against the judge stub (tests.openai_stub) and the sink archiving in-process.

One rollout is slow: the iteration closes while it runs, it is carried over (rollout_resumed) and ends in
the next iteration with its steps dense under two policy versions. Another never ends on its own: it is
carried into the last iteration and truncated at its stage timeout (status timeout, steps kept)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from consumers.materialize import build_version
from klong.cli import main
from consumers.sink import Sink
from producers.agent_config import RolloutControl
from rl.plan import parse_plan
from rl.scheduler import Scheduler
from producers.tasks import import_tasks
from schemas.errors import ConfigError
from store.catalog import Catalog
from tests.openai_stub import StubModel
from tests.policy_stub import PolicyStub
from tests.test_rubric import leaf, parent
from tests.test_tasks import klong, make_task

# stage timeouts (s). T1 bounds the slow rollout (iteration 1 and 5 steps: ~3 s quiet, 5x margin for a loaded
# machine) and truncates the endless one; T2 is far above T1's bound, so a truncation at T2 would show
T1, T2 = 30.0, 90.0
BASH = {"tool": "bash", "args": {"cmd": "echo step >> notes.txt"}}
QUICK = [{"read_paper": True}, {"tool": "bash", "args": {"cmd": "echo done > result.txt"}}]  # then end_task
ENDLESS = [{"read_paper": True}] + [{**BASH, "delay": 0.4}] * 200  # only the timeout ends it


class Scripts:
    """Policy script by the order rollouts first call the policy: #0 (iteration 1) is slow, #4 (iteration 2)
    endless, every other one quick. Iteration i+1's rollouts start only after iteration i closed.

    With close_fraction 0.75 the closes do not depend on timing: iteration 1 (4 rollouts) closes when its
    3 quick ones ended, carrying the slow one over; iteration 2 (4 new + the slow one) closes when 4 ended
    (3 quick + the slow one), carrying the endless one over; the last iteration waits for everything.
    The slow one's third call is answered only once a rollout was carried over (`carried`, set by the test):
    it outlives iteration 1 on an event, not on a guess of how long the quick ones take."""

    def __init__(self):
        self.order: list[str] = []
        self.carried = threading.Event()
        self.slow = ([{"read_paper": True}, BASH, BASH, {**BASH, "until": self.carried.is_set}]
                     + [{**BASH, "delay": 0.2}] * 5)

    def __call__(self, rollout_id: str) -> list:
        if rollout_id not in self.order:
            self.order.append(rollout_id)
        n = self.order.index(rollout_id)
        return self.slow if n == 0 else ENDLESS if n == 4 else QUICK


def readme_commands() -> list[list[str]]:
    """The `klong ...` lines of README's "Progressive RL" block, as argv lists (comments dropped)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("### Progressive RL")[1].split("```sh")[1].split("```")[0]
    return [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("klong ")]


def register_tasks(settings, tmp_path) -> None:
    paper = "# A tiny paper\nWe train a model.\nIt works.\n"
    make_task(tmp_path / "tasks", "ta", rubric=parent("root", [leaf("works [score=1]")]), paper=paper)
    make_task(tmp_path / "tasks", "tb", rubric=parent("root", [leaf("good [score=1]"), leaf("bad [score=0]")]),
              paper=paper)
    import_tasks(settings, [tmp_path / "tasks" / "ta", tmp_path / "tasks" / "tb"], "train")


def plan_dict(policy_url: str, judge_url: str) -> dict:
    return {
        "name": "two-stage",
        "tasks": ["ta", "tb"],
        "policy": {"base_url": policy_url, "model": "stub-policy"},
        "judge": {"base_url": judge_url, "model": "stub-judge", "concurrency": 4},
        "stages": [{"timeout": f"{T1}s", "rollouts_per_sample": 2, "iterations": 2},
                   {"timeout": f"{T2}s", "rollouts_per_sample": 2, "iterations": 1}],
        "dataset": {"name": "web-rl", "config": {"max_tokens": 200000, "max_staleness": 1}},
        "max_concurrent_rollouts": 8,
        "close_fraction": 0.75,
        "judge_timeout": "30s",
        "agent": {"min_time_fraction": 0.0, "reminder_every_turns": 0},
        "train": "echo {dataset} {iteration} {policy_version} {next_policy_version} >> trained.txt",
    }


@pytest.mark.timeout(900)  # ~1 min quiet (the endless rollout alone runs T1); 277 s seen at load 20
def test_two_stage_plan_carry_over_timeout_judgments_and_a_dataset_per_iteration(settings, tmp_path, capsys,
                                                                                   monkeypatch):
    register_tasks(settings, tmp_path)
    scripts = Scripts()
    carry_over = RolloutControl.carry_over

    def carry_over_and_tell(control, *args, **kwargs):  # the real carry-over, then the event the slow one awaits
        carry_over(control, *args, **kwargs)
        scripts.carried.set()

    monkeypatch.setattr(RolloutControl, "carry_over", carry_over_and_tell)
    monkeypatch.chdir(tmp_path)
    outputs = {}  # README command -> (stdout, stderr)
    with PolicyStub(scripts) as policy, StubModel() as judge:
        (tmp_path / "two-stage.yaml").write_text(yaml.safe_dump(plan_dict(policy.url, judge.url)))
        commands = readme_commands()
        assert [c[:2] for c in commands[:3]] == [["rl", "check"], ["rl", "run"], ["rl", "status"]]
        for argv in commands:  # the README block as written: check, run, status, the SQL queries
            assert main(klong(settings, *argv)) == 0, argv
            outputs[" ".join(argv[:2]) if argv[0] == "rl" else argv[1].split(" FROM ")[1]] = capsys.readouterr()
    out, err = outputs["rl run"]
    assert f"stage 2 iteration 3: policy v2, timeout {T2:g}s" in outputs["rl check"].out
    assert "stage 1 iteration 1 policy v0: 4 started, 0 carried in, 1 carried out" in out
    assert "iteration 1 closed after" in err and "built web-rl@1" in err
    assert len(scripts.order) == 12
    slow_id, endless_id = scripts.order[0], scripts.order[4]
    cat = Catalog(settings)

    # rollouts: 2 per group (sample and iteration), stage 1 then 2, timeouts as planned
    r = {row["rollout_id"]: row for row in cat.arrow(
        "SELECT rollout_id, task_id, group_id, stage, iteration, last_iteration, timeout_s, status, n_steps, "
        "n_resumes, elapsed_s, final_score, last_policy_version FROM rollouts").to_pylist()}
    assert set(r) == set(scripts.order)
    groups = cat.arrow("SELECT group_id, count(*) AS n, any_value(stage) AS stage FROM rollouts GROUP BY 1").to_pylist()
    assert sorted((g["group_id"], g["n"], g["stage"]) for g in groups) == [
        (f"two-stage:i{i}:{t}", 2, 1 if i < 3 else 2) for i in (1, 2, 3) for t in ("ta", "tb")]
    assert all(x["timeout_s"] == (T1 if x["stage"] == 1 else T2) for x in r.values())

    # the slow rollout: carried over once, steps dense and whole, pv 0 then pv 1, resumed event in between
    slow = r[slow_id]
    assert (slow["iteration"], slow["last_iteration"], slow["n_resumes"], slow["status"]) == (1, 2, 1, "finished")
    steps = cat.arrow(f"SELECT step_idx, role, policy_version FROM steps WHERE rollout_id = '{slow_id}' "
                      "ORDER BY step_idx").to_pylist()
    assert [s["step_idx"] for s in steps] == list(range(slow["n_steps"])) and slow["n_steps"] >= 15
    pvs = [s["policy_version"] for s in steps]
    cut = pvs.index(1)
    assert set(pvs[:cut]) == {0} and set(pvs[cut:]) == {1} and 0 < cut < len(pvs) - 2
    resume = cat.arrow(f"SELECT iteration, policy_version, stage, next_step_idx FROM rollout_resumes "
                       f"WHERE rollout_id = '{slow_id}'").to_pylist()
    assert resume == [{"iteration": 2, "policy_version": 1, "stage": 1, "next_step_idx": cut}]

    # the endless one: carried into iteration 3 (stage 2) and truncated at its own stage's timeout, steps kept
    endless = r[endless_id]
    assert (endless["iteration"], endless["last_iteration"], endless["status"]) == (2, 3, "timeout")
    assert T1 - 0.5 <= endless["elapsed_s"] <= T1 + 20 and endless["n_steps"] >= 10  # 20: the kill under load
    assert endless["last_policy_version"] == 2
    others = [x for k, x in r.items() if k not in (slow_id, endless_id)]
    assert all(x["status"] == "finished" and x["n_resumes"] == 0 and x["last_iteration"] == x["iteration"]
               for x in others)

    # judgments archived for every rollout: Q = 1 on task ta, 0.5 on tb
    assert all(x["final_score"] == pytest.approx(1.0 if x["task_id"] == "ta" else 0.5) for x in r.values())
    assert cat.scalar("SELECT count(DISTINCT rollout_id) FROM judge_results WHERE valid") == 12

    # the scheduler's facts: per iteration started / carried / ended / judged / dataset, and the time split
    its = cat.arrow("SELECT * FROM rl_iterations ORDER BY iteration").to_pylist()
    got = [(x["stage"], x["iteration"], x["policy_version"], x["phase"], x["started"], x["carried_in"],
            x["carried_out"], x["running"], x["finished"], x["timeout"], x["judged"], x["dataset"]) for x in its]
    assert got == [(1, 1, 0, "trained", 4, 0, 1, 0, 3, 0, 3, "web-rl@1"),
                   (1, 2, 1, "trained", 4, 1, 1, 0, 4, 0, 4, "web-rl@2"),
                   (2, 3, 2, "trained", 4, 1, 0, 0, 4, 1, 5, "web-rl@3")]
    assert all(x["rolling_s"] > 0 and x["judge_wait_s"] >= 0 and x["build_s"] > 0 and x["judge_missing"] == 0
               and x["train_s"] > 0 for x in its)
    # the train hook ran once per iteration on its dataset, in order, with the policy versions
    assert (tmp_path / "trained.txt").read_text().splitlines() == ["web-rl@1 1 0 1", "web-rl@2 2 1 2", "web-rl@3 3 2 3"]
    ended_at = cat.scalar(f"SELECT ended_at FROM rollouts WHERE rollout_id = '{slow_id}'")
    assert its[0]["closed_at"] < ended_at  # iteration 1 closed while the slow rollout ran: not killed
    rl_r = cat.arrow("SELECT rollout_id, first_iteration, last_iteration, carried FROM rl_rollouts "
                     "WHERE carried ORDER BY first_iteration").to_pylist()
    assert rl_r == [{"rollout_id": slow_id, "first_iteration": 1, "last_iteration": 2, "carried": True},
                    {"rollout_id": endless_id, "first_iteration": 2, "last_iteration": 3, "carried": True}]

    # one dataset version per iteration; a rollout is in the version of the iteration it ended in;
    # staleness = trainer policy (the iteration's) - the oldest policy that acted in the window
    assert cat.arrow("SELECT version FROM datasets WHERE dataset = 'web-rl' ORDER BY version").column(0).to_pylist() \
        == [1, 2, 3]
    samples = cat.arrow("SELECT version, rollout_id, policy_version, staleness, q FROM samples "
                        "WHERE dataset = 'web-rl'").to_pylist()
    by_version: dict = {}
    for s in samples:
        by_version.setdefault(s["version"], {})[s["rollout_id"]] = s
    assert set(by_version[1]) == {x for x in scripts.order[:4] if x != slow_id}
    assert set(by_version[2]) == {x for x in scripts.order[4:8] if x != endless_id} | {slow_id}
    assert set(by_version[3]) == set(scripts.order[8:]) | {endless_id}
    assert by_version[2][slow_id]["staleness"] == 1 and by_version[3][endless_id]["staleness"] == 1
    assert {s["staleness"] for v in by_version.values() for k, s in v.items() if k not in (slow_id, endless_id)} == {0}
    # max_staleness 0 leaves the carried-over rollout's window out, counted
    strict = build_version(settings.home, "strict", "rl", {"max_tokens": 200000, "iteration": [2],
                                                           "trainer_policy_version": 1, "max_staleness": 0})
    assert strict.manifest["drops"]["stale"]["count"] == 1 and strict.manifest["counts"]["rollouts"] == 3

    # klong rl status and the README's queries: per stage and iteration, and where the time went
    status = outputs["rl status"].out
    assert "plan two-stage" in status and "time: rolling" in status and "waiting for archive+judge" in status
    assert "web-rl@1" in status and "web-rl@3" in status and "(3 rows)" in status
    assert "web-rl@2" in outputs["rl_iterations"].out and "(3 rows)" in outputs["rl_iterations"].out
    assert slow_id in outputs["rl_rollouts WHERE carried"].out and "(2 rows)" in outputs["rl_rollouts WHERE carried"].out
    assert f"({len(samples)} rows)" in outputs["samples WHERE dataset = 'web-rl'"].out
    assert main(klong(settings, "rl", "status", "--plan", "two-stage", "--json")) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["carried_out"] for x in rows] == [1, 1, 0]
    assert main(klong(settings, "rl", "status", "--plan", "nope")) == 1
    # a second run of the plan would number its iterations 4, 5, 6: datasets never mix runs
    assert Scheduler(settings, parse_plan(plan_dict(policy.url, judge.url))).base_iteration() == 3


def test_unknown_or_eval_tasks_are_refused_before_anything_runs(settings, tmp_path):
    make_task(tmp_path / "tasks", "te", paper="# P\n")
    import_tasks(settings, [tmp_path / "tasks" / "te"], "eval")  # not archived yet: the tasks topic counts
    for tasks, message in ((["nope"], r"tasks \['nope'\] are not registered"), (["te"], r"tasks \['te'\] are eval"),
                           ({"split": "train"}, "no train task is registered")):
        plan = parse_plan({**plan_dict("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"), "tasks": tasks})
        with pytest.raises(Exception, match=message):
            Scheduler(settings, plan).run()
    assert not (settings.outbox_dir / "rl-two-stage").exists()  # refused before its outbox opened: nothing sent
    keyed = parse_plan({**plan_dict("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"),
                        "policy": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "KLONG_TEST_NO_KEY"}})
    with pytest.raises(ConfigError, match="policy.api_key_env names KLONG_TEST_NO_KEY, which is not set"):
        Scheduler(settings, keyed)


def test_ctrl_c_aborts_running_rollouts_never_starts_queued_ones_and_keeps_what_was_recorded(settings, tmp_path,
                                                                                              python_sigint):
    """`klong rl run --external-sink` as a real process, interrupted with SIGINT while 2 rollouts run and a
    third waits for a slot (max_concurrent_rollouts 2); the sink runs afterwards, as an external one would."""
    register_tasks(settings, tmp_path)
    with PolicyStub(ENDLESS) as policy:
        raw = plan_dict(policy.url, "http://127.0.0.1:9/v1")
        del raw["judge"]
        raw.update(tasks=["ta"], max_concurrent_rollouts=2,
                   stages=[{"timeout": "60s", "rollouts_per_sample": 3, "iterations": 1}])
        (tmp_path / "stop.yaml").write_text(yaml.safe_dump(raw))
        root = Path(__file__).resolve().parents[1]
        proc = subprocess.Popen([sys.executable, "-m", "klong", *klong(settings, "rl", "run", "stop.yaml",
                                                                       "--external-sink")],
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 300  # returns on the event; a CLI start on a loaded machine is slow
            while len({r.rollout_id for r in policy.requests if len(policy.for_rollout(r.rollout_id)) >= 3}) < 2:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)  # Ctrl-C once both running rollouts have taken a few turns
            out, err = proc.communicate(timeout=180)
        finally:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "stop requested" in err and "stopping (stopped by the operator): 2 running rollouts" in err
    assert len({r.rollout_id for r in policy.requests}) == 2  # the queued third never called the policy
    assert not (settings.archive_dir).exists()  # --external-sink: the run archived nothing itself
    Sink(settings).run(until_idle=True)
    cat = Catalog(settings)
    rows = cat.arrow("SELECT status, n_steps, steps_seen FROM rollouts").to_pylist()
    assert [x["status"] for x in rows] == ["aborted", "aborted"]
    assert all(x["n_steps"] == x["steps_seen"] > 4 for x in rows)  # every recorded step archived
    it = cat.arrow("SELECT phase, started, not_started, queued, running, aborted, dataset FROM rl_iterations").to_pylist()
    assert it == [{"phase": "stopped", "started": 2, "not_started": 1, "queued": 0, "running": 0, "aborted": 2,
                   "dataset": None}]


def test_judge_timeout_builds_anyway_and_a_failing_train_hook_stops_the_run(settings, tmp_path):
    """No judge answers (no `judge:` and no `klong judge run`): after judge_timeout the iteration's dataset is
    built without rewards, the missing judgments counted; then the train hook exits 3 and the run stops."""
    register_tasks(settings, tmp_path)
    with PolicyStub(QUICK) as policy:
        raw = plan_dict(policy.url, "http://127.0.0.1:9/v1")
        del raw["judge"]
        raw.update(tasks=["ta"], judge_timeout="2s", train="exit 3",
                   stages=[{"timeout": "30s", "rollouts_per_sample": 2, "iterations": 1}])
        lines: list[str] = []
        with pytest.raises(Exception, match="train hook exited with status 3"):
            Scheduler(settings, parse_plan(raw), progress=lines.append).run()
    cat = Catalog(settings)
    it = cat.arrow("SELECT phase, finished, judged, judge_missing, n_samples, dataset FROM rl_iterations").to_pylist()
    assert it == [{"phase": "stopped", "finished": 2, "judged": 0, "judge_missing": 2, "n_samples": 0,
                   "dataset": "web-rl@1"}]
    from store.datasets import load_manifest

    assert load_manifest(settings.home, "web-rl@1")["drops"]["unrewarded"]["count"] > 0  # windows, no judge score
    assert any("train hook: exit 3" in x for x in lines)
