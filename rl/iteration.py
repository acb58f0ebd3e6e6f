"""One iteration of a progressive-RL run (`rl.scheduler`): its rollouts, its summary and its two waits.

    wait_close(members, plan, t0, last, poll_s, check, say)        # close_fraction ended, or iteration_timeout
    results = {r.rollout_id: rollout_result(r, say) for r in ended}
    judged, missing = wait_archived(settings, it, results, timeout_s=plan.judge_timeout_s, poll_s=0.25,
                                    check=check, say=say)

`wait_close` returns when `close_fraction` of the iteration's rollouts have ended (all of them in the
plan's last iteration, which has nothing to carry into) or `iteration_timeout` after `t0`. `wait_archived`
returns when the archive holds the `rollout_ended` of every rollout in `results` and the judge result of
every judgment they requested, or after `timeout_s` with the missing judge results counted (the build
goes ahead; their windows are `unrewarded`). Both call `check` every round (it raises to stop the run)
and `say` a progress line every PROGRESS_EVERY_S seconds.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from core.settings import Settings
from rl.plan import RlPlan

PROGRESS_EVERY_S = 5.0


@dataclass
class Rollout:
    """A rollout the scheduler started (or carried into this iteration) and its future in the pool."""

    rollout_id: str
    task_id: str
    group_id: str
    control: Any  # producers.agent.RolloutControl
    future: Optional[Future] = None


@dataclass
class IterationSummary:
    stage: int
    iteration: int
    policy_version: int
    started: int = 0
    carried_in: int = 0
    carried_out: list = field(default_factory=list)
    not_started: int = 0
    ended: dict = field(default_factory=dict)  # status -> count
    judged: int = 0
    judge_missing: int = 0
    rolling_s: float = 0.0
    judge_wait_s: float = 0.0
    build_s: float = 0.0
    train_s: float = 0.0
    dataset: Optional[str] = None
    n_samples: int = 0
    checkpoint: Optional[str] = None  # with a managed server: the weights the next iteration is served from
    reload_s: float = 0.0
    reload_method: Optional[str] = None
    eval: Any = None  # rl.evals.EvalSummary: the held-out evaluation beside this iteration (plan's eval:)


def counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def wait_close(members: list[Rollout], plan: RlPlan, t0: float, last: bool, poll_s: float,
               check: Callable[[], None], say: Callable[[str], None]) -> None:
    need = len(members) if last else math.ceil(plan.close_fraction * len(members))
    limit = None if last else plan.iteration_timeout_s
    next_note = time.monotonic() + PROGRESS_EVERY_S
    while True:
        check()
        done = sum(r.future.done() for r in members)
        if done >= need or (limit is not None and time.monotonic() - t0 >= limit):
            return
        if time.monotonic() >= next_note:
            next_note += PROGRESS_EVERY_S
            say(f"  {done}/{len(members)} rollouts ended ({need} close the iteration), "
                f"{time.monotonic() - t0:.0f}s")
        wait([r.future for r in members if not r.future.done()], timeout=poll_s, return_when=FIRST_COMPLETED)


def rollout_result(r: Rollout, say: Callable[[str], None]) -> Any:
    exc = r.future.exception()
    if exc is not None:  # the runner itself failed (its recorder ended the rollout with status error)
        say(f"  rollout {r.rollout_id} ({r.task_id}) failed: {type(exc).__name__}: {exc}")
        return None
    return r.future.result()


def wait_archived(settings: Settings, it: int, results: dict, *, timeout_s: float, poll_s: float,
                  check: Callable[[], None], say: Callable[[str], None]) -> tuple[int, int]:
    """Waits until the archive has the end of every rollout in `results` (rollout_id -> AgentResult, None
    when the runner raised: maybe nothing recorded) and every judgment they requested. Returns (judged,
    missing) judge results."""
    from store.catalog import Catalog, sql_str

    rollouts = {rid for rid, res in results.items() if res is not None}
    requests = {res.judge_request_id for res in results.values() if getattr(res, "judge_request_id", None)}
    deadline = time.monotonic() + timeout_s
    next_note = time.monotonic() + PROGRESS_EVERY_S
    ids = lambda xs: ", ".join(map(sql_str, xs)) or "NULL"  # noqa: E731
    while True:
        check()
        cat = Catalog(settings)
        n_ended = cat.scalar(f"SELECT count(DISTINCT rollout_id) FROM rollout_ended_events "
                             f"WHERE rollout_id IN ({ids(rollouts)})")
        n_judged = cat.scalar(f"SELECT count(DISTINCT request_id) FROM judge_results WHERE request_id IN ({ids(requests)})")
        if n_ended >= len(rollouts) and n_judged >= len(requests):
            return n_judged, 0
        now = time.monotonic()
        if now >= deadline:
            say(f"  judge_timeout: building iteration {it} with {n_judged}/{len(requests)} judge results and "
                f"{n_ended}/{len(rollouts)} ended rollouts archived (is the sink / judge running?)")
            return n_judged, len(requests) - n_judged
        if now >= next_note:
            next_note += PROGRESS_EVERY_S
            say(f"  waiting for the archive: {n_ended}/{len(rollouts)} ended rollouts, "
                f"{n_judged}/{len(requests)} judge results")
        time.sleep(poll_s * 2)
