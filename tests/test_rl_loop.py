"""`klong rl run` closing the loop on the real model: SmolLM2 served by the session's vLLM server
(`policy_server`), the reference runner on the shipped tasks, rubric checks as the judge, a dataset version
per iteration, `klong train` from the served checkpoint, an in-place weight reload; Ctrl-C, and a second
run of the same plan resuming at the next iteration with the checkpoint the first one left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from services import serve
from rl.plan import parse_plan
from producers.tasks import import_tasks
from schemas.errors import ConfigError
from store.catalog import Catalog
from trainer.model import STATE_FILE

ROOT = Path(__file__).resolve().parents[1]


def loop_plan(model_dir: Path, serve_home: Path) -> dict:
    """Tiny settings: one shipped task, 2 rollouts of 2 turns of at most 24 tokens, one training step."""
    return {
        "name": "loop",
        "tasks": ["hello-file"],
        "serve": {"model": str(model_dir), "home": str(serve_home), "max_model_len": 4096},
        "judge": "checks",
        "stages": [{"timeout": "10m", "rollouts_per_sample": 2, "iterations": 2}],  # max_turns ends them
        "dataset": {"name": "loop-rl", "config": {"max_tokens": 4096, "tokenizer": str(model_dir)}},
        # SmolLM2-135M rarely calls read_file_chunk: with the paper-reading rule every step would stay in the
        # pinned prefix (no turn to train on), so the rule is off here
        "agent": {"min_time_fraction": 0.0, "reminder_every_turns": 0, "max_tokens": 24, "mandatory_reading": False,
                  "max_turns": 2, "temperature": 0.7},
        "judge_timeout": "180s",
        "train": {"config": "rl_smollm2", "timeout": "15m",
                  "overrides": {"train.max_steps": 1, "loss.tis_cap": None, "engine.cpu_threads": 2}},
    }


def rl_run(settings, plan: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "klong", "rl", "run", str(plan), "--home", str(settings.home),
                             "--bootstrap-servers", settings.bootstrap(), "--topic-prefix", settings.topics.prefix],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_plan_keys_serve_train_config_and_checks_judge():
    raw = loop_plan(Path("/m"), Path("/h"))
    plan = parse_plan(raw)
    assert plan.checks_only and plan.serve["model"] == "/m" and plan.train_config == "rl_smollm2"
    assert "train.max_steps=1" in plan.train_overrides and plan.policy.base_url == ""
    for bad, match in [({"serve": None, "policy": {"base_url": "http://h:1/v1", "model": "p"}}, "train.config needs serve"),
                       ({"serve": None}, "policy is required"),
                       ({"serve": {"model": "m", "gpu": 1}}, "unknown key serve.gpu"),
                       ({"serve": {"model": "m", "device": "tpu"}}, "serve.device"),
                       ({"train": {"config": "rl_smollm2", "command": "x"}}, "not both"),
                       ({"train": {"config": "rl_smollm2", "overrides": {"model.name": "x"}}}, "may not set model.name")]:
        with pytest.raises(ConfigError, match=match):
            parse_plan({**raw, **bad})


@pytest.mark.timeout(1800)  # two trainings of the real model on a shared 2-core machine
def test_two_iterations_train_and_reload_with_ctrl_c_and_resume(policy_server, smollm2_dir, make_settings, tmp_path,
                                                                python_sigint):
    settings = make_settings("loop")
    import_tasks(settings, [ROOT / "tasks" / "hello-file"], "train")
    serve_home = policy_server.state_file.parent
    plan = tmp_path / "loop.yaml"
    plan.write_text(yaml.safe_dump(loop_plan(Path(smollm2_dir), serve_home)))
    try:
        # Run 1: iteration 1 trains and reloads; Ctrl-C once iteration 2 has started its rollouts.
        proc = rl_run(settings, plan)
        err_lines: list[str] = []
        deadline = time.monotonic() + 900
        for line in proc.stderr:
            err_lines.append(line)
            if "iteration 2 (policy v1" in line:
                proc.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, "".join(err_lines)
        out, rest = proc.communicate(timeout=300)
        err = "".join(err_lines) + rest
        assert proc.returncode == 130, err
        assert "reload in" in err and "policy v1 served" in err
        first = serve.PolicyServer.from_home(serve_home).state
        assert first.policy_version == 1 and first.checkpoint != str(Path(smollm2_dir).resolve())

        # Run 2: the same plan resumes at its iteration 2 with policy v1 (the checkpoint run 1 left).
        proc = rl_run(settings, plan)
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err
        assert "resuming plan loop at its iteration 2 of 2 from " + first.checkpoint in err
        assert "iteration 1 (policy" not in err  # nothing of iteration 1 ran again
        second = serve.PolicyServer.from_home(serve_home).state
        assert second.policy_version == 2 and second.checkpoint not in (first.checkpoint, first.model)
        assert second.last_reload["method"] == "reload"

        cat = Catalog(settings)
        its = cat.arrow("SELECT iteration, policy_version, phase, dataset, checkpoint, train_run, reload_method, reload_s, "
                        "train_s, rolling_s, build_s, judge_wait_s FROM rl_iterations ORDER BY iteration").to_pylist()
        assert [(r["iteration"], r["policy_version"], r["phase"]) for r in its] == \
            [(1, 0, "trained"), (2, 1, "stopped"), (3, 1, "trained")]
        assert its[0]["checkpoint"] == first.checkpoint and its[2]["checkpoint"] == second.checkpoint
        assert all(its[i]["reload_method"] == "reload" and its[i]["train_s"] > 0 and its[i]["reload_s"] > 0
                   for i in (0, 2))
        # the second training started from the first one's checkpoint (lineage through training_runs)
        runs = {r["run_id"]: r for r in cat.arrow("SELECT * FROM training_runs").to_pylist()}
        assert set(runs) >= {its[0]["train_run"], its[2]["train_run"]}
        # every assistant step carries the policy_version served when it was generated
        pv = cat.arrow("SELECT r.iteration, list(DISTINCT s.policy_version) AS pvs, count(*) AS n FROM steps s "
                       "JOIN rollouts r USING (rollout_id) WHERE s.role = 'assistant' GROUP BY ALL ORDER BY 1").to_pylist()
        by_it = {r["iteration"]: r["pvs"] for r in pv}
        assert by_it[1] == [0] and by_it[3] == [1], pv
        assert by_it.get(2, [1]) == [1]  # the interrupted iteration's steps were made by v1 too
        state = json.loads((Path(second.checkpoint) / STATE_FILE).read_text())
        assert state["config"]["model"]["name"] == first.checkpoint and state["dataset"] == its[2]["dataset"]
    finally:  # the session's server serves the base model again for the next test
        server = serve.PolicyServer.from_home(serve_home)
        server.reload(server.state.model, 0, allow_restart=False)
        policy_server.state = server.state


def test_rl_build_warns_when_every_group_holds_one_rollout(settings, capsys):
    """Zero advantage everywhere (every group one rollout) is said at build time, with the reason; a group of
    two rollouts with different scores is not warned about."""
    from consumers.sink import Sink
    from klong.cli import main
    from tests.helpers import produce, rollout_events
    from tests.test_materialize import task

    args = ["--home", str(settings.home), "--bootstrap-servers", settings.bootstrap_servers,
            "--topic-prefix", settings.topics.prefix]
    produce(settings, [task("task-a")] + rollout_events("a0", 12, seed=0, group_id="ga", score=0.2)
            + rollout_events("b0", 12, seed=1, group_id="gb", score=0.9))
    Sink(settings).run(until_idle=True, idle_s=0.3)
    assert main(["dataset", "build", "ds", "--kind", "rl", "max_tokens=100000", *args]) == 0
    err = capsys.readouterr().err
    assert "all 2 group(s) hold windows of a single rollout" in err and "advantage" in err and "rollouts_per_sample" in err
    produce(settings, rollout_events("a1", 12, seed=2, group_id="ga", score=0.7))
    Sink(settings).run(until_idle=True, idle_s=0.3)
    assert main(["dataset", "build", "ds", "--kind", "rl", "max_tokens=100000", *args]) == 0
    assert "single rollout" not in capsys.readouterr().err


def test_demo_plan_is_a_valid_loop_plan(tmp_path):
    """`klong demo` runs this plan (the run itself is the two-iteration test's path, on the same model)."""
    from klong.demo import demo_plan

    plan = parse_plan(demo_plan(tmp_path / "models" / "smollm2"))
    assert plan.serve and plan.train_config and plan.checks_only and plan.n_iterations == 2
    assert plan.stages[0].rollouts_per_sample >= 2  # groups of several rollouts: advantages can be non-zero
    assert all((ROOT / "tasks" / t / "rubric.json").is_file() for t in plan.tasks)
    # the shipped RL config as it is (lr 2e-5, its steps an iteration): one step at 1e-6 did not learn
    assert not any(o.startswith(("train.max_steps=", "optim.lr=")) for o in plan.train_overrides)
    from trainer.config import CONFIG_DIR, load_config

    cfg = load_config(str(CONFIG_DIR / "rl_smollm2.yaml"), [], mode="rl", dataset="x@1")
    assert cfg.optim.lr == 2e-5 and cfg.train.max_steps == 4
