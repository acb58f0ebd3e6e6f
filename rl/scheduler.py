"""The progressive-RL stage scheduler: runs a plan (`rl.plan`) iteration by iteration.

    klong rl run two-stage.yaml                                   # progress lines per iteration; Ctrl-C stops cleanly
    >>> Scheduler(settings, load_plan("two-stage.yaml")).run()   # -> [IterationSummary, ...]

Iteration i of stage m acts with policy_version pv = initial_policy_version + (k - 1) for the plan's k-th
iteration. Iterations are numbered across stages, after the highest iteration already in the archive (1, 2,
3... on a fresh one), so `iteration` in the views and dataset filters never mixes two runs:
1. start: `samples_per_iteration` tasks (default all; a larger list is walked round-robin across
   iterations), n = `rollouts_per_sample` rollouts each, sharing group_id `PLAN:i<i>:<task>`; each is a
   `producers.agent.run_agent` call in a thread pool of `max_concurrent_rollouts`, truncated at T(m)
   (status timeout, the trajectory kept), snapshotted and sent to the judge by the runner. An
   `rl_iteration` event (phase started) lists the new rollout ids and those carried in.
2. close, when `close_fraction` of the iteration's rollouts (new + carried in) have ended, or
   `iteration_timeout` after the start. Rollouts still running are NOT killed: `control.carry_over(i+1,
   pv+1)` makes the runner emit `rollout_resumed` before its next policy call; their later steps carry
   pv+1 and they count in iteration i+1 (dense step_idx, one trajectory under two policy versions).
   They keep the stage they started in and its timeout T(m), which bounds their total wall time. Rollouts
   still queued for a free slot are never started (`not_started`: the trainer has moved on). The plan's
   last iteration has nothing to carry into, so it waits for all its rollouts.
3. wait (`judge_timeout`, progress every few seconds; rl.iteration) until the archive holds the
   `rollout_ended` of every rollout that ended in the iteration and the judge result of every judgment
   they requested; on timeout the build goes ahead (the missing ones are counted, their windows
   `unrewarded`).
4. build the RL dataset version of the iteration: `build_version(home, dataset.name, "rl",
   {**dataset.config, iteration: [i], trainer_policy_version: pv})`. The trainer of iteration i starts
   from pv, so windows acted by pv have staleness 0 and those a carried-over rollout acted under pv-1
   have staleness 1; `max_staleness` in the config leaves the older ones out (counted `stale`). A
   rollout belongs to the iteration it *ended* in (its iteration after its last resume). Note: a group
   whose rollouts end in different iterations gets its advantages within each iteration's part.
   An `rl_iteration` event (dataset_built) records the version; `rl_iterations` / `klong rl status` read them.

Held-out evaluation (the plan's `eval:`): at every `every`-th iteration's start, `rollouts_per_sample`
rollouts of each eval task run under that iteration's policy in the same pool (group ids
`PLAN:eval:i<i>:<task>`; their judge requests go to the eval queue, graded first). They are not members
of the iteration: never counted by the close rule, never carried over; the iteration waits for them (and
their judgments) before its dataset is built and the weights change. Eval tasks never enter a training
dataset. With `final` (default when the plan trains) one more evaluation runs after the last iteration,
under the policy it produced (rl.evals). `Scheduler.evals` holds the scores; `rl_evals` (store.rl)
reads them back.

Closing the loop (rl.loop): with `serve:` the scheduler starts (or finds) a managed vLLM server
(services.serve) and serves the checkpoint the plan has reached; with `train: {config: ...}` each iteration
then runs `klong train` on its dataset version from the served checkpoint (policy_version pv -> pv+1) and
reloads the server's weights in place, before the next iteration starts. Rollouts carried over wait at
their next policy call until pv+1 is served, so every step carries the version that generated it. The
`trained` event records the checkpoint and the train and reload times. Without a managed server, the
optional `train:` shell hook (placeholders {dataset} {next_policy_version} ...; rl.train_hook) runs
after each build instead; the next iteration starts when it exits 0 (else the run stops).

Resume: a run first reads what earlier runs of the same plan finished (`rl_iteration` events) and starts at
the next iteration of the plan's schedule, with the checkpoint the last one produced (rl.start).

Services (rl.services): unless `embedded_sink=False` (an external `klong sink run`
archives), a Sink runs in a thread; with a `judge:` endpoint in the plan a JudgeWorker runs in a thread
(otherwise `klong judge run` must run). Events go through the durable outbox `HOME/outbox/rl-<plan>`.
`stop()` (Ctrl-C): queued rollouts are cancelled, running ones stopped at their next turn boundary
(status aborted), an `rl_iteration` event (stopped) is recorded, and the outbox is flushed: nothing
recorded is lost.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Optional

from core.settings import Settings
from rl import start as rl_start
from rl.iteration import IterationSummary, Rollout, counts, rollout_result, wait_archived, wait_close
from producers.outbox import Outbox
from producers.recorder import publish
from rl.evals import EvalSummary, finish_eval, start_eval
from rl.plan import RlPlan, Stage, agent_config
from rl.services import Services
from rl.train_hook import run_train_hook
from schemas.errors import ConfigError, KlongError
from schemas.events import RlIteration, RlIterationPayload, new_event, uuid7

# Re-exported: callers import these from rl.scheduler.
__all__ = ["Scheduler", "IterationSummary", "EvalSummary", "Stopped"]


class Stopped(KlongError):
    """The run was stopped (Ctrl-C / stop()) before the plan was done."""


class Scheduler:
    def __init__(self, settings: Settings, plan: RlPlan, *, embedded_sink: bool = True,
                 rollout_fn: Optional[Callable[..., Any]] = None, progress: Callable[[str], None] = print,
                 poll_s: float = 0.25, fleet: Optional[int] = None):
        """`rollout_fn`: another scaffold with `producers.agent.run_agent`'s signature and meaning (default:
        the reference runner). `progress`: called with one line per step of the run. `fleet`: None runs
        rollouts in threads of this process; N >= 0 publishes them to the rollout fleet (producers.fleet)
        and starts N local `klong rollout worker` processes (0: workers run elsewhere)."""
        from producers import agent  # imported late: it is heavy

        self.settings, self.plan, self.embedded_sink, self.poll_s = settings, plan, embedded_sink, poll_s
        self.fleet = fleet
        self._agent = agent
        self.rollout_fn = rollout_fn or agent.run_agent
        self.agent_config = agent_config(plan).check_rl()  # RL: sampling the trainer reproduces (top_p/top_k off)
        env = plan.policy.api_key_env
        if env and not os.environ.get(env):
            raise ConfigError(f"plan {plan.name}: policy.api_key_env names {env}, which is not set in the environment")
        self.policy = agent.PolicyEndpoint(plan.policy.base_url, plan.policy.model,
                                           api_key=os.environ[env] if env else "EMPTY")
        self.loop = None
        if plan.serve is not None:  # a managed policy server: its URL once it runs (rl.loop)
            from rl.loop import PolicyLoop

            self.loop = PolicyLoop(settings, plan, self._say)
            if not self.agent_config.model_dir:  # token-in/token-out with the served model's tokenizer and template
                from dataclasses import replace

                self.agent_config = replace(self.agent_config, model_dir=self.loop.config.model)
        self.progress = progress
        self.run_id = uuid7()
        self._stop = threading.Event()
        self._services = Services(self._say)
        self._carried: list[Rollout] = []
        self._live: list[Rollout] = []
        self._eval_tasks: list[str] = []
        self.evals: list[EvalSummary] = []  # every held-out evaluation of this run, in order
        self._current: Optional[tuple[Stage, int, int]] = None

    # ---- public --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the run to stop (thread-safe; a signal handler may call it)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> list[IterationSummary]:
        plan = self.plan
        tasks = self.resolve_tasks()
        self._eval_tasks = rl_start.resolve_eval_tasks(self.settings, plan)
        schedule = plan.schedule()
        self._say(f"plan {plan.name}: {len(plan.stages)} stages, {len(schedule)} iterations, {len(tasks)} tasks, "
                  f"run {self.run_id}")
        summaries: list[IterationSummary] = []
        with Outbox(self.settings, self.settings.outbox_dir / f"rl-{plan.name}") as self.outbox:
            pool = self._pool()
            try:
                self._services.start(self.settings, plan, embedded_sink=self.embedded_sink)
                remaining, checkpoint = self._resume(schedule)
                if remaining and self.loop is not None:
                    self.policy = self.loop.start(checkpoint or self.loop.base_checkpoint(), remaining[0][2])
                base = self.base_iteration()
                for j, (stage, k, pv) in enumerate(remaining, 1):
                    self._current = (stage, base + j, pv)
                    summaries.append(self._iteration(pool, tasks, stage, k, base + j, pv, last=k == len(schedule)))
                if remaining and plan.final_eval and remaining[-1][1] == len(schedule):
                    # the policy the last iteration produced, scored on the held-out tasks
                    stage, _, pv = remaining[-1]
                    self._current = None  # the last iteration is done: a stop now marks no iteration stopped
                    final = self._start_eval(pool, stage, base + len(remaining) + 1, pv + 1)
                    self._live = final
                    self._finish_eval(final, {}, stage, base + len(remaining) + 1, pv + 1)
                self._flush_archived()
            except BaseException as e:  # Stopped, Ctrl-C, a failed sink/judge/build: abort, keep what is recorded
                self._abort(str(e) or type(e).__name__)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                self._services.stop()
        return summaries

    def _pool(self):
        """Where rollouts run: threads of this process, or the rollout fleet (same submit / Future interface)."""
        if self.fleet is None:
            return ThreadPoolExecutor(self.plan.max_concurrent_rollouts, thread_name_prefix="klong-rollout")
        from producers.fleet import Fleet

        per_worker = -(-self.plan.max_concurrent_rollouts // self.fleet) if self.fleet else 64
        return Fleet(self.settings, run_id=self.run_id, api_key_env=self.plan.policy.api_key_env,
                     local_workers=self.fleet, max_rollouts_per_worker=per_worker, say=self._say)

    def _resume(self, schedule: list) -> tuple[list, Optional[str]]:
        self._flush_archived(timeout=60.0)  # facts an interrupted run left in the outbox count too
        return rl_start.remaining_schedule(self.settings, self.plan, schedule, self._say)

    def base_iteration(self) -> int:
        """Iterations of a run are numbered after the highest one already in the archive (rl.start)."""
        return rl_start.base_iteration(self.settings)

    def resolve_tasks(self) -> list[str]:
        """The plan's task ids, checked against the registered tasks (rl.start)."""
        return rl_start.resolve_tasks(self.settings, self.plan)

    # ---- one iteration -------------------------------------------------------------------------

    def _iteration(self, pool, tasks: list[str], stage: Stage, k: int, it: int, pv: int, last: bool
                   ) -> IterationSummary:
        """Iteration `it` (the plan's k-th) of `stage`, acting with policy `pv`: start, close, wait, build."""
        plan, t0 = self.plan, time.monotonic()
        n_samples = stage.samples_per_iteration or len(tasks)
        first = sum(s.samples_per_iteration or len(tasks) for s, i, _ in plan.schedule() if i < k)
        samples = [tasks[(first + j) % len(tasks)] for j in range(n_samples)]
        new = [Rollout(uuid7(), t, f"{plan.name}:i{it}:{t}" + (f":{j // len(tasks)}" if j >= len(tasks) else ""),
                       self._agent.RolloutControl(iteration=it, policy_version=pv, stage=stage.index))
               for j, t in enumerate(samples) for _ in range(stage.rollouts_per_sample)]
        carried, members = self._carried, self._carried + new
        summary = IterationSummary(stage.index, it, pv, started=len(new), carried_in=len(carried))
        self._emit("started", stage, it, pv, timeout_s=stage.timeout_s, rollouts=[r.rollout_id for r in new],
                   carried_in=[r.rollout_id for r in carried])
        self._say(f"stage {stage.index} iteration {it} (policy v{pv}, timeout {stage.timeout_s:g}s): {len(new)} "
                  f"rollouts of {n_samples} samples x {stage.rollouts_per_sample}, {len(carried)} carried in")
        for r in new:
            r.future = self._pool_submit(pool, r, stage, it, pv)
        evals = self._start_eval(pool, stage, it, pv) if plan.eval and plan.eval.due(k) else []
        self._live = members + evals
        wait_close(members, plan, t0, last, self.poll_s, self._check, self._say)

        # Close: queued rollouts are not started, running ones carry over into the next iteration.
        not_started = [r for r in members if r.future.cancel()]
        running = [r for r in members if not r.future.done()]
        served = threading.Event() if self.loop is not None and not last else None  # set once pv+1 is served
        for r in running:
            r.control.carry_over(it + 1, pv + 1, served=served)
        ended = [r for r in members if r.future.done() and not r.future.cancelled()]
        results = {r.rollout_id: rollout_result(r, self._say) for r in ended}
        for r in ended:
            st = getattr(results[r.rollout_id], "status", "error")
            summary.ended[st] = summary.ended.get(st, 0) + 1
        summary.rolling_s, summary.not_started = time.monotonic() - t0, len(not_started)
        summary.carried_out = [r.rollout_id for r in running]
        self._carried = running
        self._emit("closed", stage, it, pv, timeout_s=stage.timeout_s, carried_out=summary.carried_out,
                   not_started=[r.rollout_id for r in not_started], ended=summary.ended, rolling_s=summary.rolling_s)
        self._say(f"iteration {it} closed after {summary.rolling_s:.1f}s: ended {counts(summary.ended)}, "
                  f"{len(running)} carried over, {len(not_started)} not started")

        if evals:  # the weights change only after the evaluation under them ended (its time: summary.eval.seconds)
            summary.eval = self._finish_eval(evals, results, stage, it, pv)
        t1 = time.monotonic()
        summary.judged, summary.judge_missing = self._wait_archived(it, results)
        # A rollout told to carry over takes it at its next policy call; one that ended before making another
        # (its last call was already made at the close) ended in this iteration after all: wait for it too.
        late = [r for r in running if r.future.done() and getattr(r.control, "iteration", it + 1) == it]
        if late:
            self._carried = [r for r in running if r not in late]
            summary.carried_out = [r.rollout_id for r in self._carried]
            summary.ended = dict(summary.ended)
            for r in late:
                results[r.rollout_id] = res = rollout_result(r, self._say)
                st = getattr(res, "status", "error")
                summary.ended[st] = summary.ended.get(st, 0) + 1
            summary.judged, summary.judge_missing = self._wait_archived(it, results)
        summary.judge_wait_s = time.monotonic() - t1

        from consumers.materialize import build_version

        t2 = time.monotonic()
        cfg = {**plan.dataset_config, "iteration": [it], "trainer_policy_version": pv}
        outcome = build_version(self.settings.home, plan.dataset_name, "rl", cfg, archive=self.settings.archive)
        summary.build_s, summary.dataset = time.monotonic() - t2, outcome.ref
        summary.n_samples = outcome.manifest["counts"]["samples"]
        self._emit("dataset_built", stage, it, pv, timeout_s=stage.timeout_s, dataset=outcome.ref,
                   dataset_hash=outcome.manifest["content_hash"], n_samples=summary.n_samples, judged=summary.judged,
                   judge_missing=summary.judge_missing, judge_wait_s=summary.judge_wait_s, build_s=summary.build_s,
                   rolling_s=summary.rolling_s)
        drops = ", ".join(f"{why} {d['count']}" for why, d in (outcome.manifest.get("drops") or {}).items())
        self._say(f"iteration {it}: built {outcome.ref}: {summary.n_samples} samples"
                  + (f" (left out: {drops})" if drops else "")
                  + f"; rolling {summary.rolling_s:.1f}s, judge wait {summary.judge_wait_s:.1f}s, "
                  f"build {summary.build_s:.1f}s")
        from consumers.advantages import single_rollout_warning

        warning = single_rollout_warning(outcome.manifest["counts"])
        if warning:
            self._say(f"iteration {it}: {warning}")
        if self.loop is not None and plan.train_config:
            step = self.loop.advance(outcome.ref, summary.n_samples, it, pv, self._check)
            summary.train_s, summary.checkpoint = step.train_s, step.checkpoint
            summary.reload_s, summary.reload_method = step.reload_s, step.reload_method
            self._emit("trained", stage, it, pv, timeout_s=stage.timeout_s, dataset=outcome.ref, train_s=step.train_s,
                       checkpoint=step.checkpoint, train_run=step.train_run, reload_s=step.reload_s,
                       reload_method=step.reload_method)
        elif plan.train_command:
            summary.train_s = run_train_hook(self.settings, plan, stage, it, pv, outcome.ref, self._check, self._say)
            self._emit("trained", stage, it, pv, timeout_s=stage.timeout_s, dataset=outcome.ref, train_s=summary.train_s)
        elif self.loop is not None:  # served but not trained here: the same weights act as the next version
            self.loop.server.set_version(pv + 1)
        if served is not None:
            served.set()
        from trainer.tracking import log_iteration  # rewards per iteration in the plan's experiment trackers

        log_iteration(self.settings, plan, summary, self.run_id)
        return summary

    def _start_eval(self, pool, stage: Stage, it: int, pv: int) -> list[Rollout]:
        return start_eval(self, pool, stage, it, pv)

    def _finish_eval(self, evals: list[Rollout], results: dict, stage: Stage, it: int, pv: int) -> EvalSummary:
        summary = finish_eval(self, evals, results, it, pv)
        self.evals.append(summary)
        return summary

    def _pool_submit(self, pool, r: Rollout, stage: Stage, it: int, pv: int):
        return pool.submit(self.rollout_fn, self.outbox, self.settings, r.task_id, self.policy,
                           timeout_s=stage.timeout_s, group_id=r.group_id, stage=stage.index, iteration=it,
                           policy_version=pv, rollout_id=r.rollout_id, control=r.control,
                           config=self.agent_config, judge=True)

    def _wait_archived(self, it: int, results: dict) -> tuple[int, int]:
        return wait_archived(self.settings, it, results, timeout_s=self.plan.judge_timeout_s, poll_s=self.poll_s,
                             check=self._check, say=self._say)

    # ---- stop, events, services -----------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        queued = [r for r in self._live if r.future is not None and r.future.cancel()]
        live = [r for r in self._live if r.future is not None and not r.future.done()]
        self._say(f"stopping ({reason}): {len(live)} running rollouts end at their next turn (status aborted)")
        for r in live:
            r.control.stop()
        wait([r.future for r in live])
        if self._current:
            stage, it, pv = self._current
            self._emit("stopped", stage, it, pv, timeout_s=stage.timeout_s, error=reason[:2000],
                       ended={"aborted": len(live)} if live else {}, not_started=[r.rollout_id for r in queued])
        self._flush_archived(timeout=30.0)

    def _check(self) -> None:
        """Raises Stopped when asked to stop, or the error of a failed in-process sink / judge."""
        if self._stop.is_set():
            raise Stopped("stopped by the operator")
        self._services.check()

    def _emit(self, phase: str, stage: Stage, it: int, pv: int, **fields: Any) -> None:
        payload = RlIterationPayload(plan=self.plan.name, run_id=self.run_id, phase=phase, stage=stage.index,
                                     iteration=it, policy_version=pv, **fields)
        publish(self.outbox, new_event(RlIteration, payload=payload))

    def _flush_archived(self, timeout: float = 120.0) -> None:
        """With our own sink running, wait until everything this run recorded is archived."""
        if self.embedded_sink:
            try:
                self.outbox.flush(timeout=timeout, until="archived")
            except KlongError as e:
                self._say(f"  not everything is archived yet ({e}); the outbox keeps it for the next run")

    def _say(self, line: str) -> None:
        self.progress(f"[rl {self.plan.name}] {line}")

