"""The plan's `train:` shell hook (`rl.plan`), run by the scheduler after each iteration's build.

    train_s = run_train_hook(settings, plan, stage, it, pv, "web-rl@3", check, say)

Used when the plan has no managed server (with `serve:` the scheduler trains through rl.loop).
The command gets its placeholders ({dataset} {iteration} {stage} {policy_version} {next_policy_version}
{plan} {home}) shell-quoted, and KLONG_HOME / KLONG_BOOTSTRAP_SERVERS / KLONG_TOPIC_PREFIX in its
environment. Carried-over rollouts keep running meanwhile. A non-zero exit or the plan's
`train_timeout` raises TerminalError (the run stops); `check` raising (Ctrl-C) stops the hook's process
group too. Returns the seconds it ran.
"""

from __future__ import annotations

import os
import shlex
import time
from typing import Callable

from core.procs import run_supervised
from core.settings import Settings
from rl.plan import RlPlan, Stage
from schemas.errors import TerminalError


def run_train_hook(settings: Settings, plan: RlPlan, stage: Stage, it: int, pv: int, ref: str,
                   check: Callable[[], None], say: Callable[[str], None]) -> float:
    values = {"dataset": ref, "iteration": it, "stage": stage.index, "policy_version": pv,
              "next_policy_version": pv + 1, "plan": plan.name, "home": settings.home}
    cmd = plan.train_command.format(**{k: shlex.quote(str(v)) for k, v in values.items()})
    env = {**os.environ, "KLONG_HOME": str(settings.home), "KLONG_BOOTSTRAP_SERVERS": settings.bootstrap(),
           "KLONG_TOPIC_PREFIX": settings.topics.prefix}
    say(f"iteration {it}: train hook: {cmd}")
    t0 = time.monotonic()
    status = run_supervised(cmd, shell=True, env=env, timeout_s=plan.train_timeout_s, check=check,
                            what=f"train hook {cmd}", poll_s=0.1)
    if status != 0:
        raise TerminalError(f"train hook exited with status {status}: {cmd}")
    say(f"iteration {it}: trained in {time.monotonic() - t0:.1f}s")
    return time.monotonic() - t0
