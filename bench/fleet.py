"""Rollout fleet benchmark: 1, 2 and 4 `klong rollout worker` processes measured in the same run.

    .venv/bin/python bench/fleet.py [--per-worker 250] [--seconds 60] [--workers 1,2,4] [--reply-s 0.2]

Starts its own embedded broker, a `klong sink run` process and the scripted policy server
(tests.policy_stub: every reply after `--reply-s` seconds; `--steps` bash tool calls per rollout in the
subprocess sandbox `unsafe-local`, then end_task). For each worker count N (a fresh data home and topics,
so runs do not share a backlog) it starts N workers of `--per-worker` rollouts each and keeps the
requests topic ahead of them (N x per-worker rollouts in flight), then over `--seconds` after a
warm-up prints:
  rollouts_per_min   rollouts whose result arrived in the window (it opens after the warm-up, once a first
                     rollout ended), per minute
  events_per_s       their events (steps + started/snapshot/ended) per second
  sink_lag_s p95     how far the archive trails the rollouts topic, in time: sampled every 0.25 s, the age
                     of the newest end offset the sink's committed offsets have reached
  open_requests      rollouts requested and not ended (median over the window; capacity N x per-worker runs
                     at once, the rest wait in the topic)
and the scaling ratio rollouts_per_min(2) / rollouts_per_min(1) (goal >= 1.7 where the cores allow) and
(goal) 1,000 rollouts in flight with sink lag p95 <= 2 s. The machine's cores and load average are printed
with the figures: on a shared machine they bound what any worker count can do.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition  # noqa: E402

from services.broker import BrokerProcess, ensure_topics, free_port  # noqa: E402
from core.settings import Settings, Topics  # noqa: E402
from producers.agent import AgentConfig, PolicyEndpoint, RolloutControl, run_agent  # noqa: E402
from producers.fleet import Fleet  # noqa: E402
from producers.tasks import import_tasks  # noqa: E402
from tests.policy_stub import PolicyStub  # noqa: E402
from tests.test_tasks import make_task  # noqa: E402


class LagMonitor:
    """Samples (time, end offsets of the rollouts topic) and the sink's committed offsets every 0.25 s."""

    def __init__(self, settings: Settings):
        self.settings, self.lags, self._stop = settings, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return self.lags

    def _run(self) -> None:
        s = self.settings
        cfg = s.kafka_config()
        probe, admin = KafkaConsumer(**cfg), KafkaAdminClient(**cfg)
        tps = [TopicPartition(s.topics.rollouts, p) for p in sorted(probe.partitions_for_topic(s.topics.rollouts))]
        history: list[tuple[float, dict]] = []
        try:
            while not self._stop.wait(0.25):
                now = time.monotonic()
                history.append((now, probe.end_offsets(tps)))
                got = admin.list_group_offsets(s.topics.sink_group).get(s.topics.sink_group, {})
                committed = {tp: (got[tp].offset if tp in got else 0) for tp in tps}
                reached = [t for t, ends in history if all(committed[tp] >= ends[tp] for tp in tps)]
                self.lags.append((now, now - max(reached) if reached else now - history[0][0]))
                history = [h for h in history if not reached or h[0] >= max(reached)]
        finally:
            probe.close()
            admin.close()


def one_run(bootstrap: str, work: Path, n_workers: int, args, policy: PolicyStub) -> dict:
    home = work / f"home-{n_workers}"
    settings = Settings(home=home, bootstrap_servers=bootstrap, topics=Topics(f"bf{uuid.uuid4().hex[:8]}"),
                        partitions=4)
    home.mkdir(parents=True)
    ensure_topics(settings)
    make_task(work / f"tasks-{n_workers}", "bench", paper="# A tiny paper\nWe train a model.\n")
    import_tasks(settings, [work / f"tasks-{n_workers}" / "bench"], "train")
    common = ["--home", str(home), "--bootstrap-servers", bootstrap, "--topic-prefix", settings.topics.prefix]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "klong", "sink", "run", "-q", *common], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(work / f"sink-{n_workers}.log", "ab"))]
    procs += [subprocess.Popen([sys.executable, "-m", "klong", "rollout", "worker", "-q", *common, "--max-rollouts",
                                str(args.per_worker)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=open(work / f"worker-{n_workers}-{i}.log", "ab")) for i in range(n_workers)]
    fleet = Fleet(settings, run_id=f"bench-{n_workers}", say=lambda _: None)
    config = AgentConfig(prompt="inline", min_time_fraction=0.0, reminder_every_turns=0, sandbox="unsafe-local")
    endpoint = PolicyEndpoint(policy.url, "stub")
    target = n_workers * args.per_worker
    futures, arrived = [], []
    lag = LagMonitor(settings).start()
    # The window opens `warmup` s after the first requests are out and once a first rollout ended (a loaded
    # machine may need longer for a whole rollout than the warm-up): rates are the steady state's.
    t_ready = t_start = t_end = float("inf")
    give_up = time.monotonic() + args.warmup + args.seconds + 600
    inflight = []
    try:
        while time.monotonic() < min(t_end, give_up):
            open_ = [f for f in futures if not f.done()]
            for _ in range(target + max(8, target // 10) - len(open_)):  # keep the topic a little ahead
                rid = str(uuid.uuid4())
                f = fleet.submit(run_agent, None, settings, "bench", endpoint, timeout_s=3600, group_id=f"g-{rid[:8]}",
                                 rollout_id=rid, control=RolloutControl(), config=config, judge=False)
                f.add_done_callback(lambda fut: arrived.append((time.monotonic(), fut)))
                futures.append(f)
            now = time.monotonic()
            if t_ready == float("inf"):
                fleet.producer.flush(timeout=120)
                t_ready = time.monotonic() + args.warmup
            elif t_start == float("inf") and now >= t_ready and arrived:
                t_start, t_end = now, now + args.seconds
            if now >= t_start:
                inflight.append(len(open_))
            time.sleep(0.25)
    finally:
        lags = [v for t, v in lag.stop() if t_start <= t <= t_end]
        for p in procs[1:]:  # workers: no hand-over needed, this run's topics are thrown away
            p.send_signal(signal.SIGKILL)
        procs[0].terminate()
        for p in procs:
            p.wait()
        fleet.shutdown(wait=False)
    window = [f for t, f in arrived if t_start <= t <= t_end and not f.exception()]
    ok = [f.result() for f in window]
    events = sum(r.n_steps + 3 for r in ok)
    statuses = {}
    for r in ok:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {"workers": n_workers, "rpm": len(ok) / args.seconds * 60, "events_s": events / args.seconds,
            "lag_p95": float(np.percentile(lags, 95)) if lags else float("nan"),
            "lag_max": max(lags) if lags else float("nan"),
            "inflight": float(np.median(inflight)) if inflight else 0.0, "statuses": statuses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4", help="worker counts to measure, comma-separated (default 1,2,4)")
    ap.add_argument("--per-worker", type=int, default=250, help="rollouts in flight per worker (default 250)")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window per worker count (default 60)")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds before the window (group join, ramp-up)")
    ap.add_argument("--reply-s", type=float, default=0.2, help="policy reply latency (default 0.2)")
    ap.add_argument("--steps", type=int, default=8, help="tool calls per rollout before end_task (default 8)")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="klong-bench-fleet-"))
    broker = BrokerProcess.start(free_port(), work / "broker.log")
    script = [{"tool": "bash", "args": {"cmd": "echo step >> notes.txt"}, "delay": args.reply_s}] * args.steps
    try:
        with PolicyStub(lambda rid: script, then={"tool": "end_task", "args": {"end_message": "done"},
                                                  "delay": args.reply_s}) as policy:
            policy._server.handle_error = lambda *_: None  # killed workers reset their connections: not news
            print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start "
                  f"(shared with other work: figures are what this load allowed)")
            res = []
            for n in counts:
                r = one_run(broker.bootstrap, work, n, args, policy)
                res.append(r)
                print(f"workers {n}: rollouts_per_min {r['rpm']:.0f}  events_per_s {r['events_s']:.0f}  "
                      f"sink_lag_s p95 {r['lag_p95']:.2f} max {r['lag_max']:.2f}  open_requests {r['inflight']:.0f} (capacity {n * args.per_worker})  "
                      f"ended {r['statuses']}  (load average {os.getloadavg()[0]:.1f})")
            by = {r["workers"]: r for r in res}
            if 1 in by and 2 in by and by[1]["rpm"]:
                print(f"scaling_rollouts_per_min_2_over_1 {by[2]['rpm'] / by[1]['rpm']:.2f}  (goal >= 1.7 where "
                      f"the cores allow)")
            top = max(res, key=lambda r: r["workers"])
            print(f"in_flight {min(top['inflight'], top['workers'] * args.per_worker):.0f} with sink_lag_s p95 "
                  f"{top['lag_p95']:.2f}  (goal: 1000 in flight, p95 <= 2)")
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
