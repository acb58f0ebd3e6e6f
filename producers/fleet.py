"""The scheduler's side of the rollout fleet: a stand-in for its thread pool that publishes rollout
requests and completes each future from the workers' results.

    fleet = Fleet(settings, run_id=run_id, api_key_env="OPENAI_API_KEY", local_workers=2)
    future = fleet.submit(run_agent, outbox, settings, "fre", policy, timeout_s=7200, group_id="g",
                          rollout_id=rid, control=control, config=agent_config, judge=True)
    future.result()                 # an AgentResult-like RolloutResult, once the rollout ended
    fleet.shutdown()

`submit` takes `ThreadPoolExecutor.submit`'s arguments for `producers.agent.run_agent` (the seam in
`rl.scheduler`), publishes a `schemas.fleet.RolloutRequest` to `<prefix>.rollout.requests` and
returns a `concurrent.futures.Future` that is already running (a request cannot be taken back: `cancel()`
is False, so a rollout still queued at an iteration's close is carried over like a running one). One
watcher thread reads `<prefix>.rollout.results` (from its end as of the fleet's start; the first result
per rollout wins) and forwards what the scheduler does to each rollout's `RolloutControl` (carry-over,
policy version served, stop) as commands (`producers.fleet_control`). The rollouts themselves run in
`klong rollout worker` processes (`producers.rollout_worker`): `local_workers` of them are started here,
others anywhere that reaches the same Kafka and data home. No thread runs a rollout in this process.

Requests go out without a round trip each (a burst of a thousand is one batch); one Kafka gives up on
fails its future. A result that says nothing was recorded (the worker could not start it: unknown task, missing API key)
fails its future with the worker's reason; a rollout stopped by the scheduler whose result does not come
within `stop_grace_s` (no worker alive) fails too, so a stopping run never hangs on a lost fleet.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from services.broker import ensure_topics
from core.settings import Settings
from producers.fleet_control import ControlWriter
from producers.fleet_log import config_to_dict
from schemas.errors import BrokerError, KlongError, TransientError
from schemas.fleet import RolloutRequest, RolloutResult, decode_message, encode_message

log = logging.getLogger("klong.fleet")
FLEET_PARTITIONS = 16  # requests spread over this many partitions at least: the unit a worker takes
PROGRESS_EVERY_S = 30.0


def ensure_fleet_topics(settings: Settings) -> None:
    """Creates the fleet's topics where missing (at least FLEET_PARTITIONS partitions each)."""
    ensure_topics(dataclasses.replace(settings, partitions=max(settings.partitions, FLEET_PARTITIONS)),
                  settings.topics.fleet())


class Fleet:
    def __init__(self, settings: Settings, *, run_id: str = "", api_key_env: Optional[str] = None,
                 local_workers: int = 0, max_rollouts_per_worker: int = 64, stop_grace_s: float = 120.0,
                 say: Callable[[str], None] = print):
        self.settings, self.run_id, self.api_key_env, self.say = settings, run_id, api_key_env, say
        self.stop_grace_s = stop_grace_s
        ensure_fleet_topics(settings)
        cfg = settings.kafka_config()
        try:
            self.producer = KafkaProducer(**cfg, acks="all", linger_ms=5)
            self.results = KafkaConsumer(**cfg, enable_auto_commit=False)
        except KafkaError as e:
            raise BrokerError(f"cannot reach Kafka at {settings.bootstrap()}: {e}") from e
        topic = settings.topics.rollout_results
        tps = [TopicPartition(topic, p) for p in sorted(self.results.partitions_for_topic(topic) or [])]
        self.results.assign(tps)
        self.results.seek_to_end(*tps)
        for tp in tps:  # resolve the end now: a result published after this point is never missed
            self.results.position(tp)
        self.writer = ControlWriter(settings, self.producer, run_id)
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self._controls: dict[str, Any] = {}
        self._stopped_at: dict[str, float] = {}
        self._sends: list = []  # (rollout_id, kafka future) of requests not acked yet
        self._served: list[tuple[int, threading.Event]] = []  # (policy_version, set once it is served)
        self._halt = threading.Event()
        self._logs: list = []
        self._procs = [self._start_worker(i, max_rollouts_per_worker) for i in range(local_workers)]
        self._watcher = threading.Thread(target=self._watch, name="klong-fleet-results", daemon=True)
        self._watcher.start()

    # ---- the pool interface the scheduler uses -------------------------------------------------------

    def submit(self, fn: Callable[..., Any], outbox, settings: Settings, task_id: str, policy, *, timeout_s: float,
               group_id: str, stage: int = 1, iteration: int = 0, policy_version: int = 0,
               rollout_id: str, control, config, judge: bool = True) -> Future:
        """Publishes the request (`fn` must be producers.agent.run_agent: workers run only that)."""
        from producers.agent import run_agent

        if fn is not run_agent:
            raise KlongError(f"a rollout fleet runs producers.agent.run_agent, not {getattr(fn, '__name__', fn)}: "
                             "run another scaffold in-process (no --workers / --fleet)")
        req = RolloutRequest(rollout_id=rollout_id, task_id=task_id, group_id=group_id, stage=stage,
                             iteration=iteration, policy_version=policy_version, timeout_s=timeout_s,
                             base_url=policy.base_url, model=policy.model, api_key_env=self.api_key_env,
                             config=config_to_dict(config), judge=judge, run_id=self.run_id)
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        control.rollout_id = rollout_id
        with self._lock:
            self._futures[rollout_id], self._controls[rollout_id] = fut, control
        sent = self.producer.send(self.settings.topics.rollout_requests, key=rollout_id.encode(),
                                  value=encode_message(req))
        with self._lock:  # acks are checked by the watcher: a burst of requests is not a round trip each
            self._sends.append((rollout_id, sent))
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self._halt.set()
        self._watcher.join(timeout=30)
        for p in self._procs:  # SIGTERM: a worker hands its rollouts over and flushes its outbox
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=120 if wait else 5)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in self._logs:
            f.close()
        self.results.close()
        self.producer.close()

    # ---- local workers -----------------------------------------------------------------------------

    def _start_worker(self, i: int, max_rollouts: int) -> subprocess.Popen:
        logs = self.settings.home / "fleet"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"worker-{i}.log", "ab")
        self._logs.append(out)
        argv = [sys.executable, "-m", "klong", "rollout", "worker", "--home", str(self.settings.home),
                "--bootstrap-servers", self.settings.bootstrap(), "--topic-prefix", self.settings.topics.prefix,
                "--max-rollouts", str(max_rollouts), "-v"]
        self.say(f"fleet: local worker {i} (log {logs / f'worker-{i}.log'})")
        cwd = Path(__file__).resolve().parents[1]  # this checkout's packages, whatever the caller's directory
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)

    def workers_alive(self) -> int:
        return sum(p.poll() is None for p in self._procs)

    # ---- the watcher: results in, commands out ----------------------------------------------------------

    def _watch(self) -> None:
        next_note = time.monotonic() + PROGRESS_EVERY_S
        while not self._halt.is_set():
            try:
                batch = self.results.poll(timeout_ms=200)
            except KafkaError as e:
                log.warning("fleet results: kafka unavailable (%s); retrying", e)
                time.sleep(1.0)
                continue
            for records in batch.values():
                for r in records:
                    try:
                        self._on_result(decode_message(r.value, RolloutResult))
                    except KlongError as e:
                        log.error("fleet result @%d skipped: %s", r.offset, e)
            self._check_sends()
            try:
                self._forward_controls()
            except KafkaError as e:
                log.warning("fleet commands: kafka unavailable (%s); retrying", e)
            if time.monotonic() >= next_note:
                next_note += PROGRESS_EVERY_S
                with self._lock:
                    waiting = sum(not f.done() for f in self._futures.values())
                if waiting:
                    self.say(f"fleet: {waiting} rollouts requested and not ended"
                             + (f" ({self.workers_alive()}/{len(self._procs)} local workers alive)" if self._procs
                                else " (are `klong rollout worker` processes running?)"))

    def _check_sends(self) -> None:
        with self._lock:
            done = [(rid, f) for rid, f in self._sends if f.is_done]
            self._sends = [(rid, f) for rid, f in self._sends if not f.is_done]
        for rid, f in done:
            if f.failed():  # the producer retried and gave up: nobody will run it
                self._fail(rid, f"its request was not published: {f.exception}")

    def _on_result(self, res: RolloutResult) -> None:
        with self._lock:
            fut = self._futures.get(res.rollout_id)
            control = self._controls.pop(res.rollout_id, None)
        if fut is None or fut.done():
            return  # another run's rollout, or a duplicate (at-least-once)
        if control is not None:
            control.iteration = res.iteration  # where it ended: the scheduler counts it in that iteration
            control.done.set()
        if not res.recorded:
            fut.set_exception(TransientError(f"worker {res.worker} could not run rollout {res.rollout_id}: {res.error}"))
        else:
            fut.set_result(res)

    def _forward_controls(self) -> None:
        with self._lock:
            live = [(rid, c) for rid, c in self._controls.items() if not self._futures[rid].done()]
        now = time.monotonic()
        for rid, control in live:
            pending = control._take()  # what the scheduler asked since the last round
            if pending:
                served = control._served
                self.writer.carry_over(rid, iteration=pending[0], policy_version=pending[1],
                                       wait_served=served is not None)
                if served is not None and all(e is not served for _, e in self._served):
                    self._served.append((pending[1], served))
            if control.stopped and rid not in self._stopped_at:
                self._stopped_at[rid] = now
                self.writer.stop(rid)
            elif rid in self._stopped_at and now - self._stopped_at[rid] > self.stop_grace_s:
                self._fail(rid, f"stopped {self.stop_grace_s:.0f} s ago and no worker reported its end")
        for pv, event in list(self._served):
            if event.is_set():
                self.writer.served(pv)
                self._served.remove((pv, event))

    def _fail(self, rid: str, why: str) -> None:
        with self._lock:
            fut = self._futures.get(rid)
            self._controls.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(TransientError(f"rollout {rid}: {why}"))
