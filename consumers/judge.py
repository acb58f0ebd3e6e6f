"""The judge worker: judge requests (eval and train topics) -> every rubric leaf graded -> one judge result.

    klong judge run --base-url http://vllm:8000/v1 --model openai/gpt-oss-120b --concurrency 32
    >>> JudgeWorker(settings, GraderConfig(base_url=url, model=name), JudgeConfig(concurrency=8)).run(until_idle=True)

One process, `concurrency` grading threads sharing one HTTP client; each thread makes one leaf call at
a time, so `concurrency` is the number of calls in flight at the endpoint.

Reading: one consumer, manual assignment of every partition of both request topics (no group join,
which takes ~3 s on the embedded broker), positions from the committed offsets of the consumer group
`<prefix>.judge`, else the beginning. Eval partitions are never paused and fetched with a 20 ms wait;
train partitions are paused while enough train requests are buffered. What starts when is decided by
`consumers.judge_queue.Scheduler` (eval first, at leaf granularity); before starting a train request
it asks Kafka whether an eval partition has a record this worker has not read yet (end offset >
position), so a just-produced eval request is not overtaken either.

For each request: the task (latest registered version: tasks topic + archive, `producers.tasks`), the
submission (`snapshot_ref`, else the rollout's latest archived snapshot at or before `step_idx`), then
every distinct leaf graded (`consumers.grading`), the tree aggregated (`schemas.rubric.aggregate`), and
a `judge_result` emitted through this home's outbox (`HOME/outbox/judge`): Q, per-leaf scores and
explanations (shortened if the event would pass the size limit), token usage, grading latency.
valid=false (and no score) when the request cannot be graded (unknown task, unreadable snapshot) or no
leaf got a valid answer; malformed answers otherwise only count as invalid leaves. An endpoint that
keeps failing (timeouts, 5xx, refused connections) after every retry stops the worker with an error,
like one that refuses us (bad key, unknown model): no result is emitted for the requests in flight, so
no score of zero stands in for a grade that never happened; they are read again by the next run.

Exactly one result per request_id: requests already in the ledger (`consumers.judge_queue.Ledger`) or
in the archive's `judge_results` are skipped; offsets are committed only below the lowest request
whose result is not yet durably in the outbox. A kill -9 anywhere re-reads the unfinished requests,
re-sends any result caught between outbox and ledger with its original event_id, and grades the rest.
One worker per data home (the outbox spool is locked); several homes must not share a judge group.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import msgspec
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from consumers.grading import (ChatClient, EndpointConfigError, EndpointError, GraderConfig, LeafGrade, Submission,
                               grade_leaf, load_submission, system_prompt)
from consumers.judge_queue import Job, Ledger, OffsetBook, Scheduler
from consumers.judge_result import JudgeStats, build_result
from consumers.judge_tasks import TaskCache, UnknownTask
from core.settings import Settings
from producers.outbox import Outbox
from producers.tasks import ResolvedTask
from schemas.errors import BrokerError, KlongError, ValidationError
from schemas.events import JudgeRequested, decode
from schemas.rubric import leaves
from store.tasks import judge_group

log = logging.getLogger("klong.judge")
__all__ = ["JudgeConfig", "JudgeStats", "JudgeWorker", "TaskCache", "UnknownTask", "build_result"]


@dataclass(frozen=True)
class JudgeConfig:
    concurrency: int = 8
    max_buffered_train: int = 0  # train requests held in memory; 0: max(64, 8 * concurrency)
    commit_interval_s: float = 0.5
    idle_s: float = 1.0  # until_idle: stop after this long with nothing queued, in flight or unread
    gate: bool = True  # check Kafka for unread eval requests before starting a train request


@dataclass(frozen=True)
class _Context:
    task: ResolvedTask
    submission: Submission
    system: str


class JudgeWorker:
    def __init__(self, settings: Settings, grader: GraderConfig, config: JudgeConfig = JudgeConfig(), *,
                 outbox: Optional[Outbox] = None, client: Optional[ChatClient] = None):
        if config.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {config.concurrency}")
        self.settings, self.grader, self.config = settings, grader, config
        self.max_train = config.max_buffered_train or max(64, 8 * config.concurrency)
        self.ledger = Ledger(settings.home / "judge")
        self._own_outbox, self._own_client = outbox is None, client is None
        self.outbox = outbox or Outbox(settings, settings.outbox_dir / "judge")
        self.client = client or ChatClient(grader)
        self.tasks = TaskCache(settings)
        self.book = OffsetBook()
        self.sched = Scheduler(gate=self._eval_waiting if config.gate else None)
        self.stats = JudgeStats()
        self._stats_lock = threading.Lock()
        self._systems: dict[str, str] = {}
        self._eval_tps: list[TopicPartition] = []
        self._eval_pos: dict = {}
        self._probe: Optional[KafkaConsumer] = None
        self._probe_lock = threading.Lock()
        self._fatal: Optional[BaseException] = None
        self._seq = 0

    # ---- main loop ---------------------------------------------------------------------------------

    def run(self, until_idle: bool = False, should_stop: Callable[[], bool] = lambda: False) -> JudgeStats:
        from store.catalog import Catalog

        self.stats.recovered = self.ledger.recover(self.outbox.put)
        self.ledger.add_known(r["request_id"] for r in Catalog(self.settings).arrow(
            "SELECT DISTINCT request_id FROM judge_results").to_pylist())
        self.tasks.refresh()
        log.info("judge: %s at %s, concurrency %d, %d requests already judged", self.grader.model,
                 self.grader.base_url, self.config.concurrency, len(self.ledger))
        cfg = self.settings.kafka_config()
        try:
            consumer = KafkaConsumer(**cfg, group_id=judge_group(self.settings), enable_auto_commit=False,
                                     auto_offset_reset="earliest", fetch_max_wait_ms=20, max_poll_records=500)
            self._probe = KafkaConsumer(**cfg, group_id=None, request_timeout_ms=5000)
        except KafkaError as e:
            raise BrokerError(f"cannot reach Kafka at {self.settings.bootstrap()}: {e}") from e
        threads = [threading.Thread(target=self._grade_loop, name=f"klong-judge-{i}", daemon=True)
                   for i in range(self.config.concurrency)]
        try:
            train_tps = self._assign(consumer)
            for t in threads:
                t.start()
            self._fetch_loop(consumer, train_tps, until_idle, should_stop)
            self.sched.drain()  # finish what is in flight, start nothing new
            while not self.sched.idle() and self._fatal is None and any(t.is_alive() for t in threads):
                time.sleep(0.05)
        finally:
            self.sched.close()
            for t in threads:
                if t.ident is not None:  # started
                    t.join(timeout=30)
            try:
                self._commit(consumer)
            except KafkaError as e:
                log.warning("judge: final offset commit failed (%s); the next run skips judged requests", e)
            consumer.close(autocommit=False)
            self._probe.close()
            if self._own_outbox:
                self.outbox.close()
            if self._own_client:
                self.client.close()
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    def _assign(self, consumer: KafkaConsumer) -> list[TopicPartition]:
        topics = self.settings.topics
        tps = {}
        for topic in (topics.judge_eval, topics.judge_train):
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                raise BrokerError(f"topic {topic} does not exist on {self.settings.bootstrap()} (`klong broker start` "
                                  "creates it)")
            tps[topic] = [TopicPartition(topic, p) for p in sorted(parts)]
        all_tps = tps[topics.judge_eval] + tps[topics.judge_train]
        consumer.assign(all_tps)
        for tp in all_tps:
            committed = consumer.committed(tp)
            if committed is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
            self.book.start_at(tp, consumer.position(tp))
        self._eval_tps = tps[topics.judge_eval]
        self._eval_pos = {tp: consumer.position(tp) for tp in self._eval_tps}
        return tps[topics.judge_train]

    def _fetch_loop(self, consumer, train_tps, until_idle: bool, should_stop: Callable[[], bool]) -> None:
        paused = False
        last_data = last_commit = time.monotonic()
        next_end_check = 0.0
        while not should_stop() and self._fatal is None:
            train_depth = self.sched.queued()["train"]
            if not paused and train_depth >= self.max_train:
                consumer.pause(*train_tps)
                paused = True
            elif paused and train_depth < self.max_train // 2:
                consumer.resume(*train_tps)
                paused = False
            try:
                batch = consumer.poll(timeout_ms=50, max_records=500)
                for tp, records in batch.items():
                    for r in records:
                        self._accept(tp, r)
                self._eval_pos = {tp: consumer.position(tp) for tp in self._eval_tps}
                now = time.monotonic()
                if batch:
                    last_data = now
                if now - last_commit >= self.config.commit_interval_s:
                    self._commit(consumer)
                    last_commit = now
                if until_idle and not batch and self.sched.idle() and now - last_data >= self.config.idle_s \
                        and now >= next_end_check:
                    next_end_check = now + 0.5
                    tps = list(consumer.assignment())
                    ends = consumer.end_offsets(tps)
                    if all(consumer.position(tp) >= ends[tp] for tp in tps):
                        return
            except KafkaError as e:
                log.warning("judge: kafka unavailable (%s); retrying in 1 s", e)
                time.sleep(1.0)

    def _accept(self, tp: TopicPartition, record) -> None:
        self.book.seen(tp, record.offset)
        try:
            ev = decode(record.value or b"")
            if not isinstance(ev, JudgeRequested):
                raise ValidationError(f"a {type(ev).__name__} event on a judge request topic")
        except ValidationError as e:
            log.debug("judge: skipping %s[%d]@%d: %s", tp.topic, tp.partition, record.offset, e)
            with self._stats_lock:
                self.stats.bad_messages += 1
            self.book.done(tp, record.offset)
            return
        p = ev.payload
        if p.request_id in self.ledger:
            with self._stats_lock:
                self.stats.skipped += 1
            self.book.done(tp, record.offset)
            return
        self._seq += 1
        priority = "eval" if tp.topic == self.settings.topics.judge_eval else "train"
        self.sched.add(Job(self._seq, priority, p.request_id, ev.rollout_id, p, ev.produced_at.timestamp(),
                           offsets=[(tp, record.offset)]))

    def _commit(self, consumer: KafkaConsumer) -> None:
        points = self.book.commit_points()
        if points:
            consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in points.items()})

    def _eval_waiting(self) -> bool:
        """True when an eval partition holds a record this worker has not read yet."""
        with self._probe_lock:
            ends = self._probe.end_offsets(self._eval_tps)
        pos = self._eval_pos
        return any(ends[tp] > pos.get(tp, 0) for tp in self._eval_tps)

    # ---- grading threads ---------------------------------------------------------------------------

    def _grade_loop(self) -> None:
        while True:
            work = self.sched.next(timeout=0.2)
            if work is None:
                if self.sched.closed:
                    return
                continue
            job = work[1]
            try:
                if work[0] == "start":
                    self._prepare(job)
                else:
                    self._grade(job, work[2])
            except (EndpointConfigError, EndpointError) as e:
                if self._fatal is None:
                    log.error("judge: %s; stopping (requests in flight stay unjudged and are read again)", e)
                    self._fatal = e
                self.sched.drain()
                self.sched.abandon(job)

    def _prepare(self, job: Job) -> None:
        with self._stats_lock:
            self.stats.waits[job.priority].append(job.started_at - job.produced_at)
        p = job.payload
        try:
            task = self.tasks.get(p.task_id)
            ref = p.snapshot_ref or self._latest_snapshot(job)
            sub = load_submission(self.settings, ref)
            if task.content_hash not in self._systems:
                self._systems[task.content_hash] = system_prompt(task, self.grader)
            ctx = _Context(task, sub, self._systems[task.content_hash])
            complete = self.sched.prepared(job, leaves(task.rubric), ctx)
        except (KlongError, OSError, ValueError, msgspec.DecodeError) as e:
            log.warning("judge: request %s cannot be graded: %s", job.request_id, e)
            complete = self.sched.prepared(job, [], error=f"{type(e).__name__}: {e}"[:2000])
        if complete:
            self._finish(job)

    def _latest_snapshot(self, job: Job) -> str:
        from store.catalog import Catalog, sql_str

        ref = Catalog(self.settings).scalar(
            f"SELECT ref FROM snapshots WHERE rollout_id = {sql_str(job.rollout_id)} AND step_idx <= {int(job.payload.step_idx)} "
            "ORDER BY step_idx DESC, produced_at DESC LIMIT 1")
        if ref is None:
            raise ValidationError(f"no snapshot_ref in the request and no archived snapshot of rollout "
                                  f"{job.rollout_id} at or before step {job.payload.step_idx}")
        return ref

    def _grade(self, job: Job, leaf: dict) -> None:
        ctx: _Context = job.context
        if self._fatal is not None:  # stopping: grade nothing more, the job is read again next run
            self.sched.abandon(job)
            return
        try:
            grade = grade_leaf(self.client, ctx.system, ctx.submission, leaf)
        except EndpointConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug in grading one leaf must not lose the request
            log.exception("judge: grading leaf %s of request %s failed", leaf.get("id"), job.request_id)
            grade = LeafGrade(leaf["id"], 0.0, False, f"grading failed: {type(e).__name__}: {e}"[:2000])
        if grade.endpoint_error:  # the endpoint gave up after its retries: stop, no result of zeros
            raise EndpointError(f"judge endpoint {self.grader.base_url} kept failing: {grade.explanation}")
        if self.sched.leaf_done(job, leaf["id"], grade):
            self._finish(job)

    def _finish(self, job: Job) -> None:
        if self._fatal is not None:  # a leaf of it may have been graded against a failing endpoint
            self.sched.abandon(job)
            return
        ev = build_result(job, self.grader.model)
        self.ledger.record(ev, self.outbox.put)
        for tp, off in job.offsets:
            self.book.done(tp, off)
        self.sched.finished(job)
        r = ev.payload
        with self._stats_lock:
            s = self.stats
            s.results += 1
            s.invalid_results += not r.valid
            s.leaves += len(r.leaf_scores)
            s.invalid_leaves += r.n_invalid_leaves
            s.prompt_tokens += r.prompt_tokens
            s.completion_tokens += r.completion_tokens
            s.latencies[job.priority].append(r.latency_s)
            s.finished_at = time.time()
