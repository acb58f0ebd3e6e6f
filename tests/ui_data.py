"""A small but complete data home for the viewer tests (tests/test_ui.py).

    build_plan_home(settings, workdir)      # -> {"rollouts": [...ids in policy-call order], "long": id}

What it holds, all made by the real parts: two train tasks with nested rubric trees and a blacklisted
URL, a two-stage progressive-RL plan (`klong rl run` code path: rl.scheduler) of 12
rollouts by the real agent runner against the scripted policy server, graded by the real judge worker
against the judge stub (leaf scores with explanations), carried-over rollouts, one RL dataset version per
iteration with a small `max_tokens` (so rollouts split into several windows, an oversized action is
dropped and a long tool output is truncated), and a two-step `klong train` run on the last version
(training_metrics). The sink archives in-process; nothing is mocked.
"""

from __future__ import annotations

import threading
from pathlib import Path

from consumers.sink import Sink
from klong.cli import main
from rl.plan import parse_plan
from rl.scheduler import Scheduler
from producers.tasks import import_tasks
from tests.openai_stub import StubModel
from tests.policy_stub import PolicyStub
from tests.test_rubric import leaf, parent
from tests.test_tasks import klong, make_task

BLACKLISTED = "https://github.com/leaked/answers"
PAPER = "# A tiny paper\nWe train a model.\nIt works.\n"
BASH = {"tool": "bash", "args": {"cmd": "echo step >> notes.txt"}}
LONG_OUTPUT = {"tool": "bash", "args": {"cmd": "seq 1 3000"}}  # ~14 kB of output: shown collapsed, truncated in windows
LEAK = {"tool": "bash", "args": {"cmd": f"git clone {BLACKLISTED}"}}  # a blacklist hit (the clone fails: no network)
HUGE_ACTION = {"tool": "bash", "args": {"cmd": "echo " + "y" * 5000}}  # the action alone exceeds the window budget
QUICK = [{"read_paper": True}, BASH, LONG_OUTPUT, BASH, BASH]
MARKUP = {"tool": "bash", "args": {"cmd": "echo '<b>bold</b><script>window.pwned = 1</script>'"}}  # shown as text
RICH = [{"read_paper": True}, BASH, LONG_OUTPUT, HUGE_ACTION, MARKUP] + [BASH] * 5 + [LONG_OUTPUT, BASH]
LEAKY = [{"read_paper": True}, LEAK, BASH]


class Scripts:
    """Policy script by the order rollouts first call the policy: #0 slow (carried over), #1 rich (long outputs,
    an oversized action, HTML in an output), #2 leaky (a blacklist hit), every other one quick.

    The slow one is carried over on an event, not on a guess of how long the others take: its fourth call
    is answered only once the scheduler said an iteration closed (`progress`, its line "iteration N closed
    after ..."), so iteration 1 closes with it running, and its next call resumes it under the next policy."""

    def __init__(self):
        self.order: list[str] = []
        self.closed = threading.Event()
        self.slow = ([{"read_paper": True}, BASH, BASH, {**BASH, "until": self.closed.is_set}]
                     + [{**BASH, "delay": 0.3}] * 6)

    def progress(self, line: str) -> None:
        print(line)
        if " closed after " in line:
            self.closed.set()

    def __call__(self, rollout_id: str) -> list:
        if rollout_id not in self.order:
            self.order.append(rollout_id)
        n = self.order.index(rollout_id)
        return self.slow if n == 0 else RICH if n == 1 else LEAKY if n == 2 else QUICK


def plan_dict(policy_url: str, judge_url: str) -> dict:
    return {
        "name": "ui-plan",
        "tasks": ["ta", "tb"],
        "policy": {"base_url": policy_url, "model": "stub-policy"},
        "judge": {"base_url": judge_url, "model": "stub-judge", "concurrency": 4},
        "stages": [{"timeout": "20s", "rollouts_per_sample": 2, "iterations": 2},
                   {"timeout": "30s", "rollouts_per_sample": 2, "iterations": 1}],
        "dataset": {"name": "ui-rl", "config": {"max_tokens": 8000, "overlap_turns": 1, "max_staleness": 1}},
        "max_concurrent_rollouts": 8,
        "close_fraction": 0.75,
        "judge_timeout": "30s",
        "agent": {"min_time_fraction": 0.0, "reminder_every_turns": 0},
    }


def register_tasks(settings, workdir: Path) -> None:
    src = workdir / "tasks"
    make_task(src, "ta", paper=PAPER, blacklist=BLACKLISTED + "\n", rubric=parent("ta", [
        parent("ta/code", [leaf("model works [score=1]", weight=2), leaf("loss logged [score=0]")], weight=3),
        leaf("results table [score=1]", weight=1)]))
    make_task(src, "tb", paper=PAPER, blacklist=BLACKLISTED + "\n", rubric=parent("tb", [leaf("good [score=1]"), leaf("bad [score=0]")]))
    import_tasks(settings, [src / "ta", src / "tb"], "train")


def build_plan_home(settings, workdir: Path) -> dict:
    """Runs the plan and a tiny training run into `settings.home`; returns the rollout ids by policy-call order
    and the ids of the rich rollout (`long`) and of the blacklisted one (`leaky`)."""
    register_tasks(settings, workdir)
    scripts = Scripts()
    with PolicyStub(scripts) as policy, StubModel() as judge:
        Scheduler(settings, parse_plan(plan_dict(policy.url, judge.url)), progress=scripts.progress).run()
    rc = main(klong(settings, "train", "--dataset", "ui-rl@3", "--config", "rl_tiny", "train.max_steps=2"))
    assert rc == 0, "klong train failed"
    Sink(settings).run(until_idle=True)  # the training run's metrics events
    return {"rollouts": scripts.order, "long": scripts.order[1], "leaky": scripts.order[2]}
