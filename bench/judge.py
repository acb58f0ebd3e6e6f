"""Judge benchmark: leaf throughput against the ideal, and eval-request wait under a train backlog.

    .venv/bin/python bench/judge.py [--latency 0.1] [--concurrency 16]

Starts its own embedded broker and the OpenAI-compatible stub model (`tests/openai_stub.py`, its own
process, a fixed latency per call), registers a train and an eval task, then measures in one run:
  throughput  a backlog of train requests judged by `JudgeWorker` (`--concurrency` calls in flight):
              leaves/s from the first request start to the last result, against the ideal
              concurrency / latency (goal >= 0.8)
  priority    the same worker with a train backlog queued; eval requests arrive one at a time while it
              is busy: eval wait (request produced -> grading started) p50/p95, against one train
              request's grading time
  fifo        the same load through one FIFO queue (the eval requests sent to the train topic): p50/p95
Each figure is one line; the ratios compare peers measured in this run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kafka import KafkaProducer  # noqa: E402

from consumers.grading import GraderConfig  # noqa: E402
from consumers.judge import JudgeConfig, JudgeWorker  # noqa: E402
from services.broker import BrokerProcess, ensure_topics, free_port  # noqa: E402
from core.settings import Settings, Topics  # noqa: E402
from producers.judge_requests import store_snapshot  # noqa: E402
from producers.tasks import import_tasks  # noqa: E402
from schemas.events import JudgeRequested, JudgeRequestedPayload, encode, key_of, new_event  # noqa: E402


def tree(prefix: str, n: int) -> dict:
    leaves = [{"id": f"{prefix}{i}", "requirements": f"criterion {prefix}{i} [score={i % 2}]", "weight": 1,
               "sub_tasks": [], "task_category": "Code Development", "finegrained_task_category": None} for i in range(n)]
    return {"id": "root", "requirements": "reproduced", "weight": 1, "sub_tasks": leaves, "task_category": None,
            "finegrained_task_category": None}


def task_dir(root: Path, task_id: str, n_leaves: int) -> Path:
    d = root / task_id
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"id: {task_id}\ntitle: Bench paper {task_id}\n")
    (d / "rubric.json").write_text(json.dumps(tree(task_id[0], n_leaves)))
    (d / "paper.md").write_text("# A paper\n" + "Method and experiments. " * 2000)
    return d


def request(task_id: str, priority: str, ref: str, rid: str) -> JudgeRequested:
    return new_event(JudgeRequested, rollout_id=f"roll-{rid}", payload=JudgeRequestedPayload(
        request_id=rid, step_idx=0, task_id=task_id, priority=priority, snapshot_ref=ref))


class Producer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.kp = KafkaProducer(**settings.kafka_config(), acks="all", linger_ms=5)

    def send(self, events, topic: str | None = None) -> None:
        for ev in events:
            self.kp.send(topic or self.settings.topics.for_event(ev), key=key_of(ev).encode(), value=encode(ev))
        self.kp.flush()


def fresh(settings: Settings, name: str) -> Settings:
    s = Settings(home=settings.home.parent / name, bootstrap_servers=settings.bootstrap_servers,
                 topics=Topics(f"b{uuid.uuid4().hex[:8]}"), partitions=4)
    s.home.mkdir(parents=True)
    ensure_topics(s)
    return s


def setup(base: Settings, name: str, train_leaves: int, eval_leaves: int) -> tuple[Settings, str]:
    s = fresh(base, name)
    import_tasks(s, [task_dir(s.home / "src", "train-task", train_leaves)], "train")
    import_tasks(s, [task_dir(s.home / "src", "eval-task", eval_leaves)], "eval")
    sub = s.home / "submission"
    sub.mkdir()
    (sub / "main.py").write_text("def train():\n    pass\n" * 50)
    (sub / "reproduce.log").write_text("epoch 1 loss 0.5\n" * 50)
    return s, store_snapshot(s, sub)


def throughput(base: Settings, url: str, args) -> None:
    s, ref = setup(base, "throughput", args.leaves, 4)
    n = args.requests
    Producer(s).send([request("train-task", "train", ref, f"t{i}") for i in range(n)])
    worker = JudgeWorker(s, GraderConfig(base_url=url, model="stub"), JudgeConfig(concurrency=args.concurrency,
                                                                                    idle_s=0.5))
    worker.run(until_idle=True)
    first = min(t for t, _, _, _ in worker.sched.starts)
    rate = worker.stats.leaves / (worker.stats.finished_at - first)
    ideal = args.concurrency / args.latency
    print(f"judge throughput: {rate:.1f} leaves/s over {worker.stats.leaves} leaves, ideal {ideal:.1f} "
          f"(concurrency {args.concurrency} / latency {args.latency:.3f} s): ratio {rate / ideal:.2f} (goal >= 0.8)")


def eval_waits(base: Settings, url: str, args, fifo: bool) -> tuple[list[float], float]:
    """Eval waits (produced -> started) with a train backlog queued; fifo: evals go through the train topic."""
    s, ref = setup(base, "fifo" if fifo else "priority", args.leaves, args.leaves)
    prod = Producer(s)
    prod.send([request("train-task", "train", ref, f"t{i}") for i in range(args.backlog)])
    worker = JudgeWorker(s, GraderConfig(base_url=url, model="stub"), JudgeConfig(concurrency=args.concurrency))
    stop = threading.Event()
    th = threading.Thread(target=worker.run, kwargs={"should_stop": stop.is_set})
    th.start()
    produced = {}
    try:
        while worker.stats.results < 2:
            time.sleep(0.02)
        rng = np.random.default_rng(1)
        for i in range(args.evals):
            time.sleep(float(rng.uniform(0.5, 1.5)) * args.eval_every)
            ev = request("eval-task", "eval", ref, f"e{i}")
            prod.send([ev], topic=s.topics.judge_train if fifo else None)
            produced[ev.payload.request_id] = ev.produced_at.timestamp()
        while True:
            started = {rid: t for t, _, _, rid in list(worker.sched.starts)}
            if all(rid in started for rid in produced):
                break
            time.sleep(0.05)
    finally:
        stop.set()
        th.join()
    train_time = float(np.median(worker.stats.latencies["train"]))
    return [started[rid] - t for rid, t in produced.items()], train_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.1, help="stub seconds per call")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--leaves", type=int, default=16, help="leaves per rubric")
    ap.add_argument("--requests", type=int, default=150, help="train requests for the throughput run")
    ap.add_argument("--backlog", type=int, default=150, help="train requests queued in the wait runs")
    ap.add_argument("--evals", type=int, default=20)
    ap.add_argument("--eval-every", type=float, default=0.3, help="mean seconds between eval requests")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="klong-bench-judge-"))
    broker = BrokerProcess.start(free_port(), work / "broker.log")
    stub = subprocess.Popen([sys.executable, "-m", "tests.openai_stub", "--latency", str(args.latency)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        url = stub.stdout.readline().strip()
        base = Settings(home=work / "base", bootstrap_servers=broker.bootstrap)
        throughput(base, url, args)
        prio, train_time = eval_waits(base, url, args, fifo=False)
        fifo, _ = eval_waits(base, url, args, fifo=True)
        p = {name: (np.percentile(w, 50), np.percentile(w, 95)) for name, w in (("priority", prio), ("fifo", fifo))}
        print(f"eval wait under a {args.backlog}-request train backlog, priority queue: p50 {p['priority'][0]:.3f} s, "
              f"p95 {p['priority'][1]:.3f} s; one train request's grading takes {train_time:.3f} s "
              f"(p95/grading {p['priority'][1] / train_time:.2f}, goal < 1)")
        print(f"eval wait, same load through one FIFO queue: p50 {p['fifo'][0]:.3f} s, p95 {p['fifo'][1]:.3f} s "
              f"(fifo/priority p95 {p['fifo'][1] / p['priority'][1]:.0f}x)")
    finally:
        stub.terminate()
        stub.wait()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
