"""Where a progressive-RL plan run starts (`rl.scheduler`): its tasks, its first iteration number,
and the part of its schedule earlier runs left.

    tasks = resolve_tasks(settings, plan)                 # ["fre", "bam"]; ConfigError naming what is wrong
    base = base_iteration(settings)                       # the run's iterations are base+1, base+2, ...
    remaining, checkpoint = remaining_schedule(settings, plan, plan.schedule(), say)

Tasks: the plan's `tasks`, or every task registered in its `split` alone (`eval:` tasks: the eval split
alone, `resolve_eval_tasks`); checked against what is
registered (archive, registry file and the tasks topic, so a task imported a moment ago counts): an
unknown task or an eval task is refused. Numbering: after the highest iteration already in the archive
(any plan run or rollout), so a dataset's `iteration` filter never mixes two runs. Resume: the
iterations of the schedule the plan's earlier runs finished are skipped (`rl.loop.resume_point`),
and the run starts from the checkpoint the last one produced (None: the base model).
"""

from __future__ import annotations

from typing import Callable, Optional

from core.settings import Settings
from rl.plan import RlPlan
from schemas.errors import ConfigError


def resolve_tasks(settings: Settings, plan: RlPlan) -> list[str]:
    """The plan's task ids, checked against the registered tasks: train split only."""
    from producers.tasks import registered_tasks

    splits = {t: reg.splits for t, reg in registered_tasks(settings).items()}
    if plan.split:
        ids = sorted(t for t, s in splits.items() if s == {plan.split})
        if not ids:
            raise ConfigError(f"plan {plan.name}: no {plan.split} task is registered in {settings.home} "
                              "(klong tasks import DIR --split train)")
        return ids
    unknown = [t for t in plan.tasks if t not in splits]
    if unknown:
        raise ConfigError(f"plan {plan.name}: tasks {unknown} are not registered in {settings.home} "
                          "(klong tasks list shows what is)")
    evals = [t for t in plan.tasks if "eval" in splits[t]]
    if evals:
        raise ConfigError(f"plan {plan.name}: tasks {evals} are eval tasks; RL trains on train tasks only")
    return list(plan.tasks)


def resolve_eval_tasks(settings: Settings, plan: RlPlan) -> list[str]:
    """The plan's eval task ids: registered, and in the eval split only (so never in a training dataset)."""
    from producers.tasks import registered_tasks

    if plan.eval is None:
        return []
    splits = {t: reg.splits for t, reg in registered_tasks(settings).items()}
    if not plan.eval.tasks:
        ids = sorted(t for t, s in splits.items() if s == {"eval"})
        if not ids:
            raise ConfigError(f"plan {plan.name}: eval: no eval task is registered in {settings.home} "
                              "(klong tasks import DIR --split eval)")
        return ids
    unknown = [t for t in plan.eval.tasks if t not in splits]
    if unknown:
        raise ConfigError(f"plan {plan.name}: eval.tasks {unknown} are not registered in {settings.home}")
    trains = [t for t in plan.eval.tasks if "train" in splits[t]]
    if trains:
        raise ConfigError(f"plan {plan.name}: eval.tasks {trains} are train tasks; evaluation runs held-out (eval) "
                          "tasks only, which no training dataset takes")
    return list(plan.eval.tasks)


def base_iteration(settings: Settings) -> int:
    """The highest iteration already in the archive (rl_iteration events and rollouts), 0 on a fresh one."""
    from store.catalog import Catalog

    return Catalog(settings).scalar(
        "SELECT greatest((SELECT coalesce(max(iteration), 0) FROM rl_iteration_events), "
        "(SELECT coalesce(max(last_iteration), 0) FROM rollouts))")


def remaining_schedule(settings: Settings, plan: RlPlan, schedule: list, say: Callable[[str], None]
                       ) -> tuple[list, Optional[str]]:
    """The part of the schedule earlier runs of this plan did not finish, and the checkpoint they left."""
    from rl.loop import resume_point

    point = resume_point(settings, plan)
    if point.done >= len(schedule):
        say(f"plan {plan.name}: all {len(schedule)} iterations already finished in earlier runs; "
            "nothing to do (a new plan name starts over)")
        return [], point.checkpoint
    if point.done:
        say(f"resuming plan {plan.name} at its iteration {point.done + 1} of {len(schedule)} "
            + (f"from {point.checkpoint}" if point.checkpoint else "(earlier runs finished "
               f"{point.done})"))
    return schedule[point.done:], point.checkpoint
