"""A rollout fleet worker: consumes rollout requests as one Kafka consumer group and runs them.

    klong rollout worker --max-rollouts 64            # as many as you like, on any machine with the data home
    >>> RolloutWorker(settings, max_rollouts=64).run(should_stop=stop.is_set)

Each request (`schemas.fleet.RolloutRequest`, topic `<prefix>.rollout.requests`) is one rollout of the
reference agent (`producers.agent.run_agent`: sandbox per rollout, every step recorded through this
worker's outbox as today). Exactly once per rollout id, with Kafka's at-least-once delivery:

- A request's offset is committed only after its rollout ended and its `RolloutResult` is on the results
  topic; per partition, up to the first request still running. A worker lost mid-rollout (kill -9) leaves
  its requests uncommitted: the group gives its partitions to the others, which get them again.
- Before running a request the worker asks the log (`producers.fleet_log`, after the archive caught up with
  the rollouts topic; a rollout id with no `rollout_started` in the archive, the common case, costs a set
  lookup in an incrementally read index): ended -> report that end, run nothing; started -> resume from
  its recorded steps (rollout_resumed, the same context, the next step_idx; `producers.fleet_resume`); a
  log it cannot resume from -> end it `error` with the reason. Never started -> run it.
- Fencing: when a partition leaves this worker while the worker lives (the group rebalanced), the rollouts
  of its requests are fenced before the partition is given away: nothing of theirs reaches the outbox any
  more (a step being computed is dropped, no rollout_ended), and what they put before is flushed to Kafka.
  So the next owner resumes from a log that no one writes to: never two writers of one rollout id.
  Cooperative-sticky assignment moves only the partitions that must move, so live rollouts keep running.
  Limit: that flush runs inside the rebalance; if Kafka does not take it within the rebalance timeout
  (max_poll_interval_ms, 10 s here) the next owner may read the log before those last steps arrive.
- Commands (`<prefix>.rollout.control`, read from the start by every worker): carry-over into a new
  iteration / policy version, stop, policy version served: applied to the rollout wherever it runs.

Capacity: `max_rollouts` rollouts at once (threads; each waits on the policy server or a tool
subprocess); the partitions are paused while the worker is full. The outbox is HOME/outbox/worker-<id>,
one per worker process: a killed worker's unsent events are not sent later by someone else (its rollouts
resumed from what reached the log).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from core.settings import Settings
from producers.fleet_control import ControlReader
from producers.fleet_jobs import FencedOutbox, Job, end_unresumable, run_job
from producers.fleet_log import LogState, StartedIndex, log_states, wait_log_archived
from producers.outbox import Outbox
from schemas.errors import BrokerError, KlongError
from schemas.fleet import RolloutRequest, RolloutResult, decode_message, encode_message

log = logging.getLogger("klong.fleet")


class RolloutWorker:
    def __init__(self, settings: Settings, *, max_rollouts: int = 64, worker_id: Optional[str] = None,
                 log_wait_s: float = 300.0, say: Callable[[str], None] = print):
        from producers.fleet import ensure_fleet_topics

        if max_rollouts < 1:
            raise KlongError(f"max_rollouts must be >= 1, got {max_rollouts}")
        self.settings, self.max_rollouts, self.log_wait_s, self.say = settings, max_rollouts, log_wait_s, say
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        ensure_fleet_topics(settings)
        cfg = settings.kafka_config()
        try:
            self.consumer = KafkaConsumer(
                **cfg, group_id=settings.topics.fleet_group, client_id=self.worker_id, enable_auto_commit=False,
                auto_offset_reset="earliest", max_poll_interval_ms=10_000, session_timeout_ms=6000,
                heartbeat_interval_ms=1000, partition_assignment_strategy=[CooperativeStickyAssignor])
            self.probe = KafkaConsumer(**cfg)  # end offsets of the rollouts topic (no group)
            self.admin = KafkaAdminClient(**cfg, request_timeout_ms=10_000)
            self.producer = KafkaProducer(**cfg, acks="all", linger_ms=5)
        except KafkaError as e:
            raise BrokerError(f"cannot reach Kafka at {settings.bootstrap()}: {e}") from e
        self.control = ControlReader(settings)
        self._lock = threading.Lock()
        self._jobs: dict[TopicPartition, dict[int, Job]] = {}
        self._starts: queue.Queue = queue.Queue()
        self._pool = ThreadPoolExecutor(max_rollouts, thread_name_prefix="klong-fleet")
        self._tasks: dict[str, tuple[float, object]] = {}  # task_id -> (looked up at, TaskPayload)
        self._task_lock = threading.Lock()
        self._index = StartedIndex(settings)  # which requested rollouts started somewhere (starter thread only)
        self.outbox: Optional[Outbox] = None
        self.stats = {"started": 0, "resumed": 0, "already_ended": 0, "fenced": 0, "finished": 0, "bad": 0}

    # ---- main loop (one thread polls; a starter thread asks the log; rollouts run in the pool) ----------

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> dict:
        directory = self.settings.outbox_dir / f"worker-{self.worker_id}"
        empty = False
        with Outbox(self.settings, directory, fsync="batch") as self.outbox:
            self.control.start()
            starter = threading.Thread(target=self._starter, name="klong-fleet-starter", daemon=True)
            starter.start()
            self.consumer.subscribe([self.settings.topics.rollout_requests], listener=_Rebalance(self))
            self.say(f"worker {self.worker_id}: up to {self.max_rollouts} rollouts, group "
                     f"{self.settings.topics.fleet_group}")
            try:
                while not should_stop():
                    try:
                        self._poll_once()
                    except KafkaError as e:  # broker away: uncommitted requests stay ours or come back
                        log.warning("kafka unavailable (%s); retrying in 1 s", e)
                        time.sleep(1.0)
            finally:
                self._hand_over()
                self._starts.put(None)
                self._pool.shutdown(wait=True)
                self.control.stop()
                try:
                    self.outbox.flush(timeout=60.0, until="archived")
                except KlongError as e:
                    self.say(f"worker {self.worker_id}: not everything is archived yet ({e})")
                empty = self.outbox.stats().records == 0
            for c in (self.consumer, self.probe, self.admin):
                c.close()
            self.producer.close()
        if empty:  # a worker's outbox is its own: nothing left in it, nothing to keep
            shutil.rmtree(directory, ignore_errors=True)
        return self.stats

    def _in_flight(self) -> int:
        with self._lock:
            return sum(1 for jobs in self._jobs.values() for j in jobs.values() if not j.done)

    def _poll_once(self) -> None:
        free = self.max_rollouts - self._in_flight()
        assigned = self.consumer.assignment()
        if free <= 0:
            self.consumer.pause(*assigned)
        elif self.consumer.paused():
            self.consumer.resume(*self.consumer.paused())
        batch = self.consumer.poll(timeout_ms=200, max_records=max(1, free))
        new = []
        for tp, records in batch.items():
            for r in records:
                try:
                    req = decode_message(r.value, RolloutRequest)
                except KlongError as e:  # contained: skipped and committed past, never retried forever
                    log.error("request %s[%d]@%d skipped: %s", tp.topic, tp.partition, r.offset, e)
                    self.stats["bad"] += 1
                    req = None
                job = Job(tp, r.offset, req, FencedOutbox(self.outbox), done=req is None)
                with self._lock:
                    self._jobs.setdefault(tp, {})[r.offset] = job
                if req is not None:
                    new.append(job)
        if new:
            self._starts.put(new)
        self._commit()

    def _commit(self, tps=None) -> None:
        """Commits, per partition, up to the first request whose rollout has not ended."""
        commits = {}
        with self._lock:
            for tp, jobs in self._jobs.items():
                if tps is not None and tp not in tps:
                    continue
                end = None
                for off in sorted(jobs):
                    if not jobs[off].done:
                        break
                    end = off
                    del jobs[off]
                if end is not None:
                    commits[tp] = OffsetAndMetadata(end + 1, "", -1)
        if commits:
            self.consumer.commit(commits)

    # ---- starting: ask the log, then run / resume / report ------------------------------------------------

    def _starter(self) -> None:
        while True:
            batch = self._starts.get()
            if batch is None:
                return
            while True:
                batch += self._drain()
                live = [j for j in batch if not j.outbox.fenced and not j.done]
                if not live:
                    break
                try:
                    wait_log_archived(self.settings, self.admin, self.probe, timeout_s=self.log_wait_s)
                    self._index.refresh()
                    states = log_states(self.settings, [j.request.rollout_id for j in live], index=self._index)
                except (KlongError, KafkaError) as e:
                    self.say(f"worker {self.worker_id}: cannot read the log yet ({e}); trying again")
                    time.sleep(5.0)
                    continue
                except Exception:  # never let the starter die: its requests would sit uncommitted forever
                    log.exception("worker %s: reading the log failed; trying again", self.worker_id)
                    time.sleep(5.0)
                    continue
                for j in live:
                    self._start(j, states[j.request.rollout_id])
                break

    def _drain(self) -> list:
        more = []
        while True:
            try:
                b = self._starts.get_nowait()
            except queue.Empty:
                return more
            if b is None:
                self._starts.put(None)
                return more
            more += b

    def _start(self, job: Job, state: LogState) -> None:
        from producers.agent import RolloutControl

        req = job.request
        if state.ended is not None:  # ran to its end before (a worker lost after that): report it, run nothing
            self.stats["already_ended"] += 1
            self._report(job, state.ended)
            return
        resume = state.resume
        it, pv, stage = (resume.iteration, resume.policy_version, resume.stage) if resume else \
            (req.iteration, req.policy_version, req.stage)
        job.control = RolloutControl(iteration=it, policy_version=pv, stage=stage)
        job.control.rollout_id = req.rollout_id
        self.control.attach(req.rollout_id, job.control)
        log.info("worker %s: %s rollout %s", self.worker_id, "resuming" if resume else "running", req.rollout_id)
        if state.problem:
            self._pool.submit(self._end_unresumable, job, state)
        else:
            self.stats["resumed" if resume else "started"] += 1
            self._pool.submit(self._run, job, resume)

    def _task(self, task_id: str):
        """The task's payload, looked up once a minute per task (a re-registered task is seen within a minute).
        One lookup at a time: a burst of requests for one task waits for the first lookup instead of each
        opening the archive (~100 ms of CPU each)."""
        from producers.agent import find_task

        with self._task_lock:
            hit = self._tasks.get(task_id)
            if hit is None or time.monotonic() - hit[0] > 60.0:
                hit = self._tasks[task_id] = (time.monotonic(), find_task(self.settings, task_id))
            return hit[1]

    def _run(self, job: Job, resume) -> None:
        try:
            result = run_job(job, self.settings, self.worker_id, self._task, resume)
        finally:
            self.control.detach(job.request.rollout_id)
        if result is None:
            self.stats["fenced"] += 1
        else:
            self._report(job, result)

    def _end_unresumable(self, job: Job, state: LogState) -> None:
        try:
            result = end_unresumable(job, state, self.worker_id)
        finally:
            self.control.detach(job.request.rollout_id)
        if result is not None:
            self._report(job, result)

    def _report(self, job: Job, result: RolloutResult) -> None:
        """Publishes the result, then lets the request's offset be committed (not for a fenced rollout)."""
        with job.outbox._lock:
            if job.outbox.fenced:
                return
            if result.worker != self.worker_id:
                result = RolloutResult(**{**_fields(result), "worker": self.worker_id})
            self.producer.send(self.settings.topics.rollout_results, key=result.rollout_id.encode(),
                               value=encode_message(result)).get(timeout=60)
            job.done = True
        self.stats["finished"] += 1

    # ---- giving partitions away -----------------------------------------------------------------------------

    def _fence(self, tps) -> None:
        """Fences every rollout of `tps`, flushes what they recorded to Kafka, commits what ended."""
        tps = set(tps)
        with self._lock:
            jobs = [j for tp in tps for j in self._jobs.get(tp, {}).values() if not j.done]
        for j in jobs:
            j.outbox.fence()
            if j.control is not None:
                j.control.stop()  # its thread ends at the next turn boundary, recording nothing
        if jobs:
            self.say(f"worker {self.worker_id}: {len(jobs)} rollouts handed over ({len(tps)} partitions given away)")
            try:
                self.outbox.flush(timeout=60.0, until="acked")
            except KlongError as e:
                log.error("handing over: the outbox did not reach Kafka (%s): the next owner may miss steps", e)
        try:
            self._commit(tps)
        except KafkaError as e:
            log.warning("commit on hand-over failed (%s): the next owner checks the log anyway", e)
        with self._lock:
            for tp in tps:
                self._jobs.pop(tp, None)

    def _hand_over(self) -> None:
        """Stopping (SIGTERM, Ctrl-C): running rollouts go to the other workers (they resume from the log)."""
        try:
            self._fence(list(self._jobs))
        except Exception as e:  # stopping anyway; uncommitted requests are redelivered
            log.warning("hand-over incomplete: %s", e)


def _fields(msg) -> dict:
    return {f: getattr(msg, f) for f in msg.__struct_fields__}


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: RolloutWorker):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        if revoked:
            self.worker._fence(revoked)

    def on_partitions_lost(self, lost):
        if lost:
            self.worker._fence(lost)

    def on_partitions_assigned(self, assigned):
        if assigned:
            log.info("worker %s: assigned %s", self.worker.worker_id, sorted(tp.partition for tp in assigned))
