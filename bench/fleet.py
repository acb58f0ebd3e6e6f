"""Rollout fleet benchmark: 1, 2 and 4 `klong rollout worker` processes, then 1,000 rollouts in flight,
each measured in the same run.

    .venv/bin/python bench/fleet.py [--per-worker 250] [--seconds 45] [--workers 1,2,4] [--big 1000]
    .venv/bin/python bench/fleet.py --workers '' --big 1000 --big-workers 2 --big-nice 10    # the big run alone

Starts its own embedded broker and the scripted policy server (tests.policy_stub, in this process: every
reply after `--reply-s` seconds; `--steps` bash tool calls per rollout in the subprocess sandbox
`unsafe-local`, then end_task). Each run gets a fresh data home, topics and `klong sink run` process, so
runs share no backlog. A run of N workers starts them with `--per-worker` rollouts each and keeps the
requests topic ahead of them (N x per-worker rollouts in flight); the `--big` run asks for that many in
flight (1% more room) over `--big-workers` workers, run under `nice -n <--big-nice>` so that the sink and
the broker come first for the CPU (what keeps the archive fresh on a loaded machine). Over `--seconds`
after a warm-up (the window opens once a first rollout ended) each run prints the following. Keep the
window near a rollout's length at full load or longer (~60 s with 1,000 in flight here): the first
rollouts start together, and a shorter window ends before most of that first wave does.
  in_flight peak/median  rollouts started (a first policy call) and not ended, sampled every 0.25 s
  rollouts_per_min       rollouts whose result arrived in the window, per minute
  events_per_s           their events (steps + started/snapshot/ended) per second
  sink_lag_s p50/p95     how far the archive trails the rollouts topic, in time: sampled every 0.25 s, the
                         age of the newest end offset the sink's committed offsets have reached
  cpu_ms_per_rollout     CPU time in the window per finished rollout, by process: the workers (Python), their
                         tool subprocesses (bash), the broker, the sink, and this process (the policy server
                         and the scheduler's side); `cores_used` is their sum per second of window; the
                         largest worker's resident memory at the window's end
  load                   the machine's 1-minute load average, mean and max over the window
Then the scaling ratio rollouts_per_min(2) / rollouts_per_min(1) against the goal (>= 1.7 where the cores
allow), split into the CPU the two runs got (cores_used(2) / cores_used(1)) times how many rollouts each
core-minute finished, beside what the cores allow: with the 1-worker run already using `cores_used` of the
machine's cores, 2 workers can at most reach cores / cores_used(1) (less on a shared machine: the load
average says how shared); and the big run against its goal (1,000 in flight with sink lag p95 <= 2 s). The
machine is shared with other work: the figures are what its load allowed, printed beside that load.
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
import psutil

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

PARTS = ("workers", "tools", "broker", "sink", "bench")


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


def cpu_seconds(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU seconds so far by part; `tools`: the workers' reaped children (their bash tool calls)."""
    out = dict.fromkeys(PARTS, 0.0)
    for part, ps in procs.items():
        for p in ps:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            out[part] += t.user + t.system
            if part == "workers":
                out["tools"] += t.children_user + t.children_system
    return out


def one_run(name: str, broker: BrokerProcess, work: Path, n_workers: int, per_worker: int, args,
            policy: PolicyStub, worker_nice: int = 0) -> dict:
    bootstrap = broker.bootstrap
    home = work / f"home-{name}"
    settings = Settings(home=home, bootstrap_servers=bootstrap, topics=Topics(f"bf{uuid.uuid4().hex[:8]}"),
                        partitions=4)
    home.mkdir(parents=True)
    ensure_topics(settings)
    make_task(work / f"tasks-{name}", "bench", paper="# A tiny paper\nWe train a model.\n")
    import_tasks(settings, [work / f"tasks-{name}" / "bench"], "train")
    common = ["--home", str(home), "--bootstrap-servers", bootstrap, "--topic-prefix", settings.topics.prefix]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "klong", "sink", "run", "-q", *common], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(work / f"sink-{name}.log", "ab"))]
    nice = ["nice", "-n", str(worker_nice)] if worker_nice else []
    procs += [subprocess.Popen([*nice, sys.executable, "-m", "klong", "rollout", "worker", "-q", *common,
                                "--max-rollouts", str(per_worker)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=open(work / f"worker-{name}-{i}.log", "ab")) for i in range(n_workers)]
    watched = {"workers": [psutil.Process(p.pid) for p in procs[1:]], "sink": [psutil.Process(procs[0].pid)],
               "broker": [psutil.Process(broker.pid)], "bench": [psutil.Process()]}
    fleet = Fleet(settings, run_id=f"bench-{name}", say=lambda _: None)
    config = AgentConfig(prompt="inline", min_time_fraction=0.0, reminder_every_turns=0, sandbox="unsafe-local")
    endpoint = PolicyEndpoint(policy.url, "stub")
    target = n_workers * per_worker
    mine: set[str] = set()
    futures, arrived = [], []
    lag = LagMonitor(settings).start()
    # The window opens `warmup` s after the first requests are out and once a first rollout ended (a loaded
    # machine may need longer for a whole rollout than the warm-up): rates are the steady state's.
    t_ready = t_start = t_end = float("inf")
    give_up = time.monotonic() + args.warmup + args.seconds + 600
    inflight, loads, cpu0 = [], [], None
    try:
        while time.monotonic() < min(t_end, give_up):
            open_ = [f for f in futures if not f.done()]
            for _ in range(target + max(8, target // 10) - len(open_)):  # keep the topic a little ahead
                rid = str(uuid.uuid4())
                mine.add(rid)
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
                cpu0 = cpu_seconds(watched)
            if now >= t_start:
                with policy._lock:
                    started = sum(1 for rid in list(policy.cursor) if rid in mine)
                inflight.append(started - len(arrived))
                loads.append(os.getloadavg()[0])
            time.sleep(0.25)
        cpu1 = cpu_seconds(watched) if cpu0 is not None else None
        rss = max((p.memory_info().rss for p in watched["workers"]), default=0) / 2**20
    finally:
        lags = [v for t, v in lag.stop() if t_start <= t <= t_end]
        for p in procs[1:]:  # workers: no hand-over needed, this run's topics are thrown away
            p.send_signal(signal.SIGKILL)
        procs[0].terminate()
        for p in procs:
            p.wait()
        fleet.shutdown(wait=False)
        with policy._lock:  # this run's script cursors: the policy server outlives the run
            for rid in mine:
                policy.cursor.pop(rid, None)
    window = [f for t, f in arrived if t_start <= t <= t_end and not f.exception()]
    ok = [f.result() for f in window]
    events = sum(r.n_steps + 3 for r in ok)
    statuses: dict[str, int] = {}
    for r in ok:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    cpu = {k: (cpu1[k] - cpu0[k]) for k in PARTS} if cpu1 else dict.fromkeys(PARTS, float("nan"))
    pct = (lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan"))
    return {"name": name, "workers": n_workers, "capacity": target, "rpm": len(ok) / args.seconds * 60,
            "finished": len(ok), "events_s": events / args.seconds, "lag_p50": pct(lags, 50), "lag_p95": pct(lags, 95),
            "lag_max": max(lags) if lags else float("nan"), "inflight_peak": max(inflight, default=0),
            "inflight_median": pct(inflight, 50), "statuses": statuses, "cpu": cpu,
            "cores_used": sum(cpu.values()) / args.seconds, "load_mean": float(np.mean(loads)) if loads else 0.0,
            "load_max": max(loads, default=0.0), "nice": worker_nice, "rss": rss}


def report(r: dict) -> None:
    n = max(r["finished"], 1)
    per = "  ".join(f"{k} {r['cpu'][k] / n * 1000:.1f}" for k in PARTS)
    print(f"{r['name']}: workers {r['workers']} (capacity {r['capacity']})  in_flight peak {r['inflight_peak']} "
          f"median {r['inflight_median']:.0f}  rollouts_per_min {r['rpm']:.0f}  events_per_s {r['events_s']:.0f}  "
          f"sink_lag_s p50 {r['lag_p50']:.2f} p95 {r['lag_p95']:.2f} max {r['lag_max']:.2f}  ended {r['statuses']}")
    print(f"    cpu_ms_per_rollout: {per}  |  cores_used {r['cores_used']:.2f} of {os.cpu_count()}  |  "
          f"load mean {r['load_mean']:.1f} max {r['load_max']:.1f}  |  workers at nice {r['nice']}, "
          f"largest {r['rss']:.0f} MB resident", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4", help="worker counts to measure, comma-separated (default 1,2,4; "
                                                        "'' for none)")
    ap.add_argument("--per-worker", type=int, default=250, help="rollouts in flight per worker (default 250)")
    ap.add_argument("--big", type=int, default=1000, help="rollouts in flight in the last run (default 1000; 0: skip)")
    ap.add_argument("--big-workers", type=int, default=2, help="workers of the big run (default 2)")
    ap.add_argument("--seconds", type=float, default=45.0, help="measured window per run (default 45)")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds before the window (group join, ramp-up)")
    ap.add_argument("--reply-s", type=float, default=0.2, help="policy reply latency (default 0.2)")
    ap.add_argument("--big-nice", type=int, default=10,
                    help="the big run's workers run under `nice -n N` (default 10): the sink and broker come first "
                         "for the CPU, which bounds the sink's lag on a loaded machine")
    ap.add_argument("--steps", type=int, default=8, help="tool calls per rollout before end_task (default 8)")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="klong-bench-fleet-"))
    broker = BrokerProcess.start(free_port(), work / "broker.log")
    script = [{"tool": "bash", "args": {"cmd": "echo step >> notes.txt"}, "delay": args.reply_s}] * args.steps
    try:
        with PolicyStub(lambda rid: script, then={"tool": "end_task", "args": {"end_message": "done"},
                                                  "delay": args.reply_s}, keep_requests=False) as policy:
            policy._server.handle_error = lambda *_: None  # killed workers reset their connections: not news
            print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start (shared with "
                  f"other work: figures are what this load allowed); {args.steps + 1} policy calls of "
                  f"{args.reply_s} s per rollout", flush=True)
            res = []
            for n in counts:
                res.append(one_run(f"workers-{n}", broker, work, n, args.per_worker, args, policy))
                report(res[-1])
            by = {r["workers"]: r for r in res}
            if 1 in by and 2 in by and by[1]["rpm"] and by[1]["cores_used"] and by[2]["cores_used"]:
                one, two = by[1], by[2]
                eff1, eff2 = one["rpm"] / one["cores_used"], two["rpm"] / two["cores_used"]
                bound = min(2.0, os.cpu_count() / one["cores_used"])
                print(f"scaling_rollouts_per_min_2_over_1 {two['rpm'] / one['rpm']:.2f}  "
                      "(goal >= 1.7 where the cores allow)")
                print(f"    = CPU the runs got {two['cores_used'] / one['cores_used']:.2f}x ({one['cores_used']:.2f} "
                      f"-> {two['cores_used']:.2f} cores of {os.cpu_count()}, load {one['load_mean']:.1f} -> "
                      f"{two['load_mean']:.1f}) x rollouts per core-minute {eff2 / eff1:.2f}x ({eff1:.0f} -> "
                      f"{eff2:.0f}); "
                      f"with the machine to itself the 1-worker run's {one['cores_used']:.2f} cores leave room for at "
                      f"most {bound:.2f}x")
            if args.big:
                # 1% more room than the goal: a slot is free between a rollout's end and the next start
                per = -(-args.big * 101 // 100 // args.big_workers)
                big = one_run(f"in-flight-{args.big}", broker, work, args.big_workers, per, args, policy,
                              args.big_nice)
                report(big)
                met = big["inflight_peak"] >= args.big and big["lag_p95"] <= 2.0
                print(f"in_flight_peak {big['inflight_peak']} with sink_lag_s p95 {big['lag_p95']:.2f}  "
                      f"(goal: {args.big} in flight, p95 <= 2: {'met' if met else 'not met'})")
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
