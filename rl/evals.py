"""Held-out evaluation inside a progressive-RL plan run (the plan's `eval:`; `rl.scheduler` calls it).

    evals = start_eval(sched, pool, stage, it, pv)        # n rollouts of every eval task under policy pv
    summary = finish_eval(sched, evals, results, it, pv)  # waits for them and their judgments -> EvalSummary
    summary.line()                                        # "eval under policy v0: mean score 0.350, solved 6/20 ..."

The rollouts go into the scheduler's pool like the iteration's own, with group ids
`PLAN:eval:i<iteration>:<task>` (`eval_group_prefix`; the view `rl_evals` in store.rl parses them back), the
iteration and policy_version of the policy they score. Their tasks are registered eval tasks
(`rl.start.resolve_eval_tasks`), so the runner asks for their judgments at eval priority and no
training dataset takes them. `finish_eval` waits for every one of them (they are never carried over: the
weights change only after the evaluation under them ended) and for the judge results of them and of the
iteration's own ended rollouts, then reads the scores from the archive.
"""

from __future__ import annotations

import time
from concurrent.futures import wait
from dataclasses import dataclass
from typing import Any, Optional

from core.settings import Settings
from rl.iteration import Rollout, rollout_result


@dataclass
class EvalSummary:
    """One held-out evaluation of a plan run: the policy it scored and what the archive holds of its rollouts."""

    iteration: int
    policy_version: int
    rollouts: int = 0
    judged: int = 0
    mean_score: Optional[float] = None  # over the judged rollouts
    solved: int = 0  # judged rollouts with score 1.0
    seconds: float = 0.0

    def line(self) -> str:
        if not self.judged:
            return f"eval under policy v{self.policy_version}: no judged rollout of {self.rollouts}"
        return (f"eval under policy v{self.policy_version}: mean score {self.mean_score:.3f}, solved "
                f"{self.solved}/{self.judged} ({self.rollouts} rollouts, {self.seconds:.0f}s)")


def eval_group_prefix(plan: str, iteration: int) -> str:
    """The group ids of a plan's evaluation at an iteration start with this (store.rl's `rl_evals` parses them)."""
    return f"{plan}:eval:i{iteration}:"


def eval_scores(settings: Settings, summary: EvalSummary, prefix: str) -> EvalSummary:
    """Fills `summary` from the archive's rollouts of one evaluation (group ids starting with `prefix`)."""
    from store.catalog import Catalog, sql_str

    row = Catalog(settings).arrow(
        "SELECT count(*) AS n, count(*) FILTER (WHERE n_judged > 0) AS judged, "
        "avg(final_score) FILTER (WHERE n_judged > 0) AS mean, count(*) FILTER (WHERE final_score = 1.0) AS solved "
        f"FROM rollouts WHERE starts_with(group_id, {sql_str(prefix)})").to_pylist()[0]
    summary.judged, summary.mean_score, summary.solved = row["judged"], row["mean"], row["solved"]
    return summary



def start_eval(sched: Any, pool, stage, it: int, pv: int) -> list[Rollout]:
    """Submits `rollouts_per_sample` rollouts of every eval task of the scheduler's plan under policy pv."""
    from schemas.events import uuid7

    spec, prefix = sched.plan.eval, eval_group_prefix(sched.plan.name, it)
    evals = [Rollout(uuid7(), t, prefix + t, sched._agent.RolloutControl(iteration=it, policy_version=pv,
                                                                          stage=stage.index))
             for t in sched._eval_tasks for _ in range(spec.rollouts_per_sample)]
    sched._say(f"eval at iteration {it} (policy v{pv}): {len(evals)} rollouts of {len(sched._eval_tasks)} held-out "
               f"tasks x {spec.rollouts_per_sample}")
    for r in evals:
        r.future = sched._pool_submit(pool, r, stage, it, pv)
    return evals


def finish_eval(sched: Any, evals: list[Rollout], results: dict, it: int, pv: int) -> EvalSummary:
    """Waits for the evaluation's rollouts and, with `results` (the iteration's own ended rollouts), for their
    judge results; returns the scores the archive holds and says them."""
    t0 = time.monotonic()
    while not all(r.future.done() for r in evals):
        sched._check()
        wait([r.future for r in evals], timeout=sched.poll_s)
    mine = {r.rollout_id: rollout_result(r, sched._say) for r in evals if not r.future.cancelled()}
    sched._wait_archived(it, {**results, **mine})
    summary = eval_scores(sched.settings, EvalSummary(it, pv, rollouts=len(evals), seconds=time.monotonic() - t0),
                          eval_group_prefix(sched.plan.name, it))
    sched._say(f"iteration {it}: {summary.line()}")
    return summary
