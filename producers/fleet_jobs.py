"""One fleet request as a worker holds it (`Job`), the outbox view that fences it, and running it.

    job = Job(tp, offset, request, FencedOutbox(worker_outbox))
    result = run_job(job, settings, worker_id, task_lookup, resume)    # None: fenced meanwhile
    job.outbox.fence()                                                   # nothing more of it is recorded

`run_job` runs the request with `producers.agent.run_agent` (resuming from `resume`, a
`producers.fleet_log.ResumePoint`, when the log says it started elsewhere) and returns the RolloutResult to
report; a failure before anything was recorded (unknown task, missing API key, a config this worker does not
know) is a result with `recorded=False` and the reason. `end_unresumable` ends a rollout whose log cannot be
resumed from: `error`, with the reason, after its recorded steps.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from kafka import TopicPartition

from core.settings import Settings
from producers.fleet_log import LogState, config_from_dict
from producers.outbox import Outbox
from schemas.errors import KlongError
from schemas.fleet import RolloutRequest, RolloutResult

log = logging.getLogger("klong.fleet")


class Fenced(KlongError):
    """This worker gave the rollout's request away: it records nothing more of it."""


class FencedOutbox:
    """The worker's outbox as one rollout sees it: puts pass until `fence()`, then raise Fenced."""

    def __init__(self, outbox: Outbox):
        self._outbox, self._lock, self.fenced = outbox, threading.Lock(), False
        self.settings = outbox.settings

    def put(self, ev) -> None:
        with self._lock:  # a put never races the fence: after fence() returns nothing more goes in
            if self.fenced:
                raise Fenced("the rollout's request went to another worker")
            self._outbox.put(ev)

    def fence(self) -> None:
        with self._lock:
            self.fenced = True

    def __getattr__(self, name):
        return getattr(self._outbox, name)


@dataclass
class Job:
    tp: TopicPartition
    offset: int
    request: Optional[RolloutRequest]  # None: not a valid request (logged, skipped)
    outbox: FencedOutbox
    control: object = None  # producers.agent_config.RolloutControl once started
    done: bool = False
    notes: list = field(default_factory=list)



def run_job(job: Job, settings: Settings, worker_id: str, task: Callable[[str], object], resume
            ) -> Optional[RolloutResult]:
    from producers.agent import PolicyEndpoint, run_agent

    req = job.request
    try:
        key = os.environ.get(req.api_key_env) if req.api_key_env else "EMPTY"
        if key is None:
            raise KlongError(f"the policy's API key variable {req.api_key_env} is not set on worker {worker_id}")
        res = run_agent(job.outbox, settings, req.task_id, PolicyEndpoint(req.base_url, req.model, api_key=key),
                        timeout_s=req.timeout_s, group_id=req.group_id, stage=req.stage, iteration=req.iteration,
                        policy_version=req.policy_version, rollout_id=req.rollout_id, control=job.control,
                        config=config_from_dict(req.config), judge=req.judge, task=task(req.task_id), resume=resume)
    except Fenced:
        return None
    except Exception as e:  # nothing recorded (unknown task, bad config): the scheduler hears why
        log.exception("rollout %s could not run", req.rollout_id)
        return RolloutResult(rollout_id=req.rollout_id, status="error", n_steps=0, worker=worker_id,
                             error=f"{type(e).__name__}: {e}"[:2000], recorded=False)
    if job.outbox.fenced:  # its end was refused: nothing to report
        return None
    return RolloutResult(rollout_id=req.rollout_id, status=res.status, n_steps=res.n_steps, elapsed_s=res.elapsed_s,
                         snapshot_ref=res.snapshot_ref, judge_request_id=res.judge_request_id, error=res.error,
                         n_turns=res.n_turns, worker=worker_id, resumed=resume is not None,
                         iteration=job.control.iteration)


def end_unresumable(job: Job, state: LogState, worker_id: str) -> Optional[RolloutResult]:
    from producers.recorder import RolloutRecorder

    req, n = job.request, state.next_step_idx
    error = f"worker lost mid-rollout and {state.problem}"
    try:
        rec = RolloutRecorder.from_existing(job.outbox, rollout_id=req.rollout_id, next_step_idx=n,
                                            iteration=job.control.iteration, policy_version=job.control.policy_version,
                                            task_id=req.task_id, group_id=req.group_id, timeout_s=req.timeout_s,
                                            stage=job.control.stage)
        rec.end("error", error=error)
    except Fenced:
        return None
    return RolloutResult(rollout_id=req.rollout_id, status="error", n_steps=n, error=error, worker=worker_id,
                         resumed=True, iteration=job.control.iteration)
