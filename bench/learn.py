"""Does the closed loop learn beyond its training tasks? SmolLM2 on CPU, the shipped task family, the shipped config.

    .venv/bin/python bench/learn.py [--iterations 3] [--samples 6] [--rollouts 4] [--eval-rollouts 2] [--eval-tasks 0]

In a fresh data home (embedded broker, SmolLM2 imported unless --model gives a directory, the shipped family
tasks/family registered: train split and held-out eval split), one `klong rl run` plan (rl.scheduler):
a held-out evaluation under policy v0 (every eval task x --eval-rollouts), then --iterations iterations on
the train split (--samples tasks x --rollouts rollouts each, round-robin over the train tasks; the demo's
agent block; `train: {config: rl_smollm2, overrides: {loss.tis_cap: null}}`; the dataset drops groups whose
rollouts all scored the same, `drop_constant_groups`: their advantage is 0, so they would take training steps
and teach nothing), and the final held-out evaluation under the policy the last iteration produced. Then, on
the last iteration's dataset version and from the same base weights, --peer-steps RL steps and as many SFT
steps of `klong train` over the same rows.

Prints: per iteration the training reward (mean score, solved) and the training steps' ratio (mean, max),
clip fraction and KL; held-out solve rates before and after with 95 % Wilson intervals and a two-proportion
z-test; held-out mean scores with 95 % intervals and Welch's test; the RL step's tokens/s over the SFT
step's (goal >= 0.6). Goal: held-out mean score +0.15 or more with p < 0.05.

The defaults are the run README reports (22.9 min on a quiet 2-core machine: the loop 19.7 min, the
standalone RL/SFT steps the rest). --eval-rollouts 4 narrows the intervals at the cost of generation time.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.real_home import real_model_home  # noqa: E402
from services.broker import free_port  # noqa: E402
from klong.demo import demo_plan  # noqa: E402

FAMILY = ROOT / "tasks" / "family"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def normal_p(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    return math.erfc(abs(z) / math.sqrt(2))


def two_proportion(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """(z, two-sided p) of the pooled two-proportion z-test."""
    if not n1 or not n2:
        return 0.0, 1.0
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    z = (k2 / n2 - k1 / n1) / se if se > 0 else 0.0
    return z, normal_p(z)


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    """(mean, standard error, 95 % half-width, normal approximation)."""
    n = len(xs)
    m = sum(xs) / n if n else float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    se = sd / math.sqrt(n) if n else float("nan")
    return m, se, 1.96 * se


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """(difference b - a, two-sided p) of Welch's test, normal approximation (n is tens of rollouts)."""
    (ma, sa, _), (mb, sb, _) = mean_ci(a), mean_ci(b)
    se = math.sqrt(sa * sa + sb * sb)
    return mb - ma, normal_p((mb - ma) / se) if se > 0 else 1.0


def train_step_rate(home: Path, bootstrap: str, dataset: str, mode: str, config: str, model: str,
                    steps: int) -> tuple[float, float, float]:
    """(tokens/s over the training steps, tokens, seconds) of a standalone `klong train` on `dataset`."""
    out = subprocess.run([sys.executable, "-m", "klong", "train", "--dataset", dataset, "--mode", mode, "--config",
                          config, "--home", str(home), "--bootstrap-servers", bootstrap, f"model.name={model}",
                          f"train.max_steps={steps}", "train.epochs=1", "engine.cpu_threads=2",
                          *(["loss.tis_cap=null"] if mode == "rl" else [])],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    [run_dir] = [Path(line.split(" done: ", 1)[1]) for line in out.splitlines()
                 if line.startswith("run ") and " done: " in line]
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    tokens, secs = sum(r["tokens"] for r in rows), sum(r["step_s"] for r in rows)
    shutil.rmtree(run_dir, ignore_errors=True)  # ~0.5 GB a checkpoint
    return tokens / secs, tokens, secs


def eval_rows(cat, plan: str, iteration: int) -> list[tuple[str, float]]:
    """(task kind, score) of each ended rollout of one evaluation; the kind is the family task id's middle."""
    from store.catalog import sql_str

    rows = cat.arrow(f"SELECT regexp_extract(task_id, '^fam-(.*)-[0-9]+-[0-9a-f]+$', 1) AS kind, "
                     f"coalesce(final_score, 0.0) AS s FROM rollouts WHERE starts_with(group_id, "
                     f"{sql_str(f'{plan}:eval:i{iteration}:')}) AND status <> 'running'").to_pylist()
    return [(r["kind"], r["s"]) for r in rows]


def by_kind(rows: list[tuple[str, float]]) -> dict[str, tuple[int, int, float]]:
    """kind -> (solved, rollouts, mean score)."""
    kinds: dict[str, list[float]] = {}
    for kind, score in rows:
        kinds.setdefault(kind, []).append(score)
    return {k: (sum(x == 1.0 for x in xs), len(xs), sum(xs) / len(xs)) for k, xs in kinds.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a SmolLM2 transformers directory (default: import the GGUF into the bench home)")
    ap.add_argument("--iterations", type=int, default=3, help="training iterations (default 3)")
    ap.add_argument("--samples", type=int, default=6, help="train tasks per iteration (default 6: every kind, one twice)")
    ap.add_argument("--rollouts", type=int, default=4, help="rollouts per train task: the group size (default 4)")
    ap.add_argument("--eval-rollouts", type=int, default=2, help="rollouts per held-out task per evaluation (default 2)")
    ap.add_argument("--eval-tasks", type=int, default=0,
                    help="held-out tasks per evaluation, the first N in the family order (default 0: all 20)")
    ap.add_argument("--max-turns", type=int, default=2, help="policy turns per rollout (default 2; the demo: 3)")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens per turn (default 96, as the demo)")
    ap.add_argument("--concurrency", type=int, default=8, help="rollouts at once (default 8)")
    ap.add_argument("--peer-steps", type=int, default=2, help="steps of the standalone RL and SFT runs (default 2)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra rl_smollm2 override for the loop's training (repeatable)")
    ap.add_argument("--keep-constant-groups", action="store_true",
                    help="train on groups whose rollouts all scored the same too (advantage 0: they cost steps, "
                         "teach nothing); default: the dataset drops them (drop_constant_groups)")
    ap.add_argument("--keep", action="store_true", help="keep the bench home (printed)")
    args = ap.parse_args()

    from services import serve
    from rl.plan import parse_plan
    from rl.scheduler import Scheduler
    from producers.tasks import import_tasks
    from store.catalog import Catalog

    t_start = time.monotonic()
    with real_model_home("klong-bench-learn-", args.model, args.keep) as (settings, broker, model):
        home = settings.home
        for split in ("train", "eval"):
            import_tasks(settings, sorted((FAMILY / split).iterdir()), split)
        raw = demo_plan(model, 600.0, args.max_tokens, args.max_turns)
        overrides = {"loss.tis_cap": None, "engine.cpu_threads": 2}
        overrides.update(dict(o.split("=", 1) for o in args.override))
        # the train tasks in the family's order (kinds interleaved), so each iteration's samples mix the kinds
        order = lambda split: sorted((p.name for p in (FAMILY / split).iterdir()), key=lambda t: int(t.split("-")[-2]))  # noqa: E731
        train_ids, eval_ids = order("train"), order("eval")[:args.eval_tasks or None]
        raw.update(name="learn", tasks=train_ids, max_concurrent_rollouts=args.concurrency,
                   stages=[{"timeout": "600s", "rollouts_per_sample": args.rollouts, "iterations": args.iterations,
                            "samples_per_iteration": args.samples}],
                   eval={"tasks": eval_ids, "every": args.iterations, "rollouts_per_sample": args.eval_rollouts,
                         "final": True},
                   dataset={"name": "learn-rl", "config": {**raw["dataset"]["config"],
                                                           "drop_constant_groups": not args.keep_constant_groups}},
                   train={"config": "rl_smollm2", "timeout": "60m", "overrides": overrides})
        raw["serve"]["port"] = free_port()
        plan = parse_plan(raw)
        sched = Scheduler(settings, plan, progress=lambda line: print(line, file=sys.stderr, flush=True))
        summaries = sched.run()
        loop_s = time.monotonic() - t_start
        cat = Catalog(settings)

        print(f"plan: {args.iterations} iterations x {args.samples} train tasks x {args.rollouts} rollouts, "
              f"{args.max_turns} turns of {args.max_tokens} tokens "
              f"(rl_smollm2, overrides {overrides}); held-out: {len(eval_ids)} eval tasks x "
              f"{args.eval_rollouts} rollouts per evaluation; loop {loop_s / 60:.1f} min")
        print("per iteration: training reward of the policy that acted, and its training steps")
        for s in summaries:
            row = cat.arrow(f"SELECT mean_score, solved, judged FROM rl_iterations WHERE plan = 'learn' AND "
                            f"iteration = {s.iteration}").to_pylist()[0]
            steps = cat.arrow(
                "SELECT step, max(value) FILTER (WHERE metric = 'ratio_mean') AS ratio_mean, "
                "max(value) FILTER (WHERE metric = 'ratio_max') AS ratio_max, "
                "max(value) FILTER (WHERE metric = 'clip_frac') AS clip, max(value) FILTER (WHERE metric = 'kl') AS kl "
                f"FROM training_metrics WHERE run_id = (SELECT train_run FROM rl_iterations WHERE plan = 'learn' "
                f"AND iteration = {s.iteration}) GROUP BY step ORDER BY step").to_pylist()
            mean = row["mean_score"]
            print(f"  iteration {s.iteration} policy v{s.policy_version}: mean score "
                  f"{'n/a' if mean is None else f'{mean:.3f}'}, solved {row['solved']}/{row['judged']}; "
                  f"{s.n_samples} samples, rolling {s.rolling_s:.0f}s, training {s.train_s:.0f}s")
            for st in steps:
                f = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
                print(f"    step {st['step']}: ratio mean {f(st['ratio_mean'])} max {f(st['ratio_max'])}, "
                      f"clip {f(st['clip'])}, KL {f(st['kl'])}")
        if len(sched.evals) >= 2:
            first, last = sched.evals[0], sched.evals[-1]
            rows_a, rows_b = eval_rows(cat, "learn", first.iteration), eval_rows(cat, "learn", last.iteration)
            a, b = [x for _, x in rows_a], [x for _, x in rows_b]
            ka, kb = sum(x == 1.0 for x in a), sum(x == 1.0 for x in b)
            for name, e, xs, k in (("before", first, a, ka), ("after", last, b, kb)):
                lo, hi = wilson(k, len(xs))
                m, _, half = mean_ci(xs)
                print(f"held-out {name} (policy v{e.policy_version}): solved {k}/{len(xs)} = {k / max(len(xs), 1):.3f} "
                      f"[95% {lo:.3f}, {hi:.3f}]; mean score {m:.3f} +- {half:.3f}")
            before, after = by_kind(rows_a), by_kind(rows_b)
            line = lambda k, n, m: f"{k}/{n} {m:.2f}"  # noqa: E731
            print("held-out by kind (solved/rollouts, mean score): " + "; ".join(
                f"{kind} {line(*before[kind])} -> {line(*after.get(kind, (0, 0, 0.0)))}" for kind in sorted(before)))
            z, p = two_proportion(ka, len(a), kb, len(b))
            diff, pw = welch(a, b)
            print(f"solve rate change {kb / max(len(b), 1) - ka / max(len(a), 1):+.3f}: two-proportion z {z:.2f}, p {p:.4f}")
            print(f"held-out mean score change {diff:+.3f}: Welch p {pw:.4f} (goal +0.15 with p < 0.05: "
                  f"{'met' if diff >= 0.15 and pw < 0.05 else 'NOT met'})")
            base_rate = ka / max(len(a), 1)
            print(f"base solve rate on the held-out split: {base_rate:.3f} (goal between 0.10 and 0.60: "
                  f"{'met' if 0.10 <= base_rate <= 0.60 else 'NOT met'})")
        last_ds = next((s.dataset for s in reversed(summaries) if s.n_samples), None)
        server = serve.PolicyServer.from_home(home)
        if server is not None:  # the peers need the memory and the cores
            server.stop()
        if last_ds:
            rl_tps, rl_tok, rl_s = train_step_rate(home, broker.bootstrap, last_ds, "rl", "rl_smollm2", str(model),
                                                   args.peer_steps)
            sft_tps, sft_tok, sft_s = train_step_rate(home, broker.bootstrap, last_ds, "sft", "sft_smollm2", str(model),
                                                      args.peer_steps)
            ratio = rl_tps / sft_tps
            print(f"training on {last_ds}, {args.peer_steps} steps each, same rows: RL {rl_tps:.1f} tokens/s "
                  f"({rl_tok:.0f} tokens in {rl_s:.1f}s), SFT {sft_tps:.1f} tokens/s ({sft_tok:.0f} in {sft_s:.1f}s): "
                  f"RL/SFT {ratio:.2f} (goal >= 0.6: {'met' if ratio >= 0.6 else 'NOT met'})")
        print(f"total {(time.monotonic() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
