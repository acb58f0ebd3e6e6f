"""One iteration of the closed RL loop on SmolLM2, time per phase, beside standalone peers in the same run.

    .venv/bin/python bench/loop.py [--model DIR] [--max-turns 3] [--max-tokens 96]

In a fresh data home (embedded broker, the demo's shipped tasks, SmolLM2 imported unless --model gives a
directory): starts the policy server (services.serve), then measures
  - vLLM standalone: generation tokens/s of 2 concurrent token-prompt completions (the rollouts' concurrency);
  - one loop iteration (rl.scheduler with serve: and train:): generation (rollouts, `rolling_s`),
    judge + archive wait (`judge_wait_s`: until the archive holds the ended rollouts and their judge results),
    dataset build, training (`klong train`, 1 step), weight reload (in place);
  - the trainer standalone: the same `klong train` on the same dataset version, tokens/s;
  - a restart of the server on the new checkpoint, beside the reload.
Goals (printed with the figures): archive + build + reload <= 5% of the iteration (judge_wait_s counts
as the archive term: it includes grading, so the check is conservative); reload <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib import request

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services import serve  # noqa: E402
from bench.real_home import real_model_home  # noqa: E402
from services.broker import free_port  # noqa: E402
from klong.demo import DEMO_TASKS, demo_plan  # noqa: E402


def vllm_tokens_per_s(server: serve.PolicyServer, n_requests: int = 2, max_tokens: int = 64) -> float:
    """Aggregate generation tokens/s of n concurrent completions of `max_tokens` each (ignore_eos)."""
    def one(i: int) -> int:
        body = {"model": server.model_name, "prompt": f"Write a long story about a ship, number {i}.",
                "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True, "seed": i}
        req = request.Request(f"{server.base_url}/completions", data=json.dumps(body).encode(),
                              headers={"Content-Type": "application/json"})
        return json.load(request.urlopen(req, timeout=600))["usage"]["completion_tokens"]

    one(99)  # warm-up
    t0 = time.monotonic()
    with ThreadPoolExecutor(n_requests) as pool:
        tokens = sum(pool.map(one, range(n_requests)))
    return tokens / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a SmolLM2 transformers directory (default: import the GGUF into the bench home)")
    ap.add_argument("--max-turns", type=int, default=3, help="policy turns per rollout (default 3)")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens per turn (default 96, as the demo: a whole tool call)")
    ap.add_argument("--rollout-timeout", type=float, default=600.0, help="bound on a rollout's time (default 600 s)")
    ap.add_argument("--keep", action="store_true", help="keep the bench home (printed)")
    args = ap.parse_args()

    import subprocess

    from rl.plan import parse_plan
    from rl.scheduler import Scheduler
    from producers.tasks import import_tasks
    from store.catalog import Catalog

    with real_model_home("klong-bench-loop-", args.model, args.keep) as (settings, broker, model):
        home = settings.home
        import_tasks(settings, [ROOT / "tasks" / t for t in DEMO_TASKS], "train")
        raw = demo_plan(model, args.rollout_timeout, args.max_tokens, args.max_turns)
        raw.update(name="bench-loop", stages=[{**raw["stages"][0], "iterations": 1}])
        t0 = time.monotonic()
        server = serve.start(settings, serve.ServeConfig(model=str(model), max_model_len=4096, port=free_port()))
        start_s = time.monotonic() - t0
        gen_tps = vllm_tokens_per_s(server)

        plan = parse_plan(raw)
        [it] = Scheduler(settings, plan, progress=lambda line: print(line, file=sys.stderr, flush=True)).run()
        phases = {"generation (rollouts)": it.rolling_s, "judge + archive wait": it.judge_wait_s,
                  "dataset build": it.build_s, "training (klong train, 1 step)": it.train_s,
                  f"weight reload ({it.reload_method})": it.reload_s}
        total = sum(phases.values())

        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "klong", "train", "--dataset", it.dataset, "--mode", "rl",
                              "--config", plan.train_config, "--home", str(home), "--bootstrap-servers",
                              broker.bootstrap, f"model.name={model}", *plan.train_overrides],
                             check=True, capture_output=True, text=True).stdout
        train_wall = time.monotonic() - t0
        [run_dir] = [Path(line.split(" done: ", 1)[1]) for line in out.splitlines()
                     if line.startswith("run ") and " done: " in line]  # "run ID done: RUN_DIR"
        steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
        tokens, step_s = sum(r["tokens"] for r in steps), sum(r["step_s"] for r in steps)

        server = serve.PolicyServer.from_home(home)
        t0 = time.monotonic()
        server._restart(it.checkpoint)
        restart_s = time.monotonic() - t0

        n_roll = len(DEMO_TASKS) * raw["stages"][0]["rollouts_per_sample"]
        print(f"one loop iteration ({n_roll} rollouts of {args.max_turns} turns, {args.max_tokens} tokens/turn): "
              f"{total:.1f} s")
        for name, sec in phases.items():
            print(f"  {name:34} {sec:8.2f} s  {100 * sec / total:5.1f}%")
        share = (it.judge_wait_s + it.build_s + it.reload_s) / total
        print(f"archive(+judge) + build + reload share of the iteration: {100 * share:.2f}% "
              f"(goal <= 5%: {'met' if share <= 0.05 else 'NOT met'})")
        print(f"reload {it.reload_s:.2f} s vs restart {restart_s:.1f} s ({restart_s / max(it.reload_s, 1e-9):.0f}x); "
              f"goal reload <= 2 s: {'met' if it.reload_s <= 2 else 'NOT met'}; first start {start_s:.1f} s")
        print(f"vLLM standalone generation: {gen_tps:.1f} tokens/s (2 concurrent requests)")
        print(f"trainer standalone: {tokens / step_s:.1f} tokens/s in its training step ({tokens:.0f} tokens, "
              f"{step_s:.1f} s; {train_wall:.1f} s wall with process start, model load and checkpoint)")
        groups = Catalog(settings).arrow("SELECT group_id, list(final_score) AS scores FROM rollouts "
                                         "GROUP BY group_id").to_pylist()
        scores = [x for g in groups for x in g["scores"] if x is not None]
        print(f"rewards: mean {sum(scores) / max(len(scores), 1):.2f} over {len(scores)} judged rollouts; "
              f"{sum(len(set(g['scores'])) > 1 for g in groups)} of {len(groups)} groups with varying rewards "
              "(non-zero advantages)")
        print(f"dataset {it.dataset} ({it.n_samples} samples), checkpoint {it.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
