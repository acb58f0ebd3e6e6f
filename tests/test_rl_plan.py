"""Progressive-RL plan parsing: durations, the schedule, and every validation error naming its key."""

from __future__ import annotations

import copy

import pytest
import yaml

from klong.cli import main
from rl.plan import load_plan, parse_duration, parse_plan
from schemas.errors import ConfigError

PLAN = {
    "name": "two-stage",
    "tasks": ["fre", "lca"],
    "policy": {"base_url": "http://127.0.0.1:8000/v1", "model": "policy", "api_key_env": "POLICY_KEY"},
    "judge": {"base_url": "http://127.0.0.1:8001/v1", "model": "judge", "concurrency": 4},
    "stages": [{"timeout": "2h", "rollouts_per_sample": 4, "iterations": 2},
               {"timeout": "4h", "rollouts_per_sample": 8, "iterations": 1, "samples_per_iteration": 1}],
    "dataset": {"name": "web-rl", "config": {"max_tokens": 4096, "max_staleness": 1}},
    "close_fraction": 0.75,
    "iteration_timeout": "1h30m",
    "judge_timeout": "90s",
    "initial_policy_version": 3,
}


@pytest.mark.parametrize("text,seconds", [
    ("2h", 7200), ("90s", 90), ("1.5m", 90), ("1h30m", 5400), ("500ms", 0.5), (" 2 H ", 7200), (45, 45),
    (0.25, 0.25), ("1d", 86400),
])
def test_durations(text, seconds):
    assert parse_duration(text, "stages[0].timeout") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["2 hours", "h", "", "-5s", "0s", 0, -1, True, "1.5", [1], "2h junk"])
def test_bad_durations_name_the_key(bad):
    with pytest.raises(ConfigError, match=r"stages\[0\]\.timeout"):
        parse_duration(bad, "stages[0].timeout")


def test_a_full_plan_and_its_schedule():
    plan = parse_plan(PLAN)
    assert plan.tasks == ("fre", "lca") and plan.split is None
    assert [(s.index, s.timeout_s, s.rollouts_per_sample, s.iterations, s.samples_per_iteration)
            for s in plan.stages] == [(1, 7200, 4, 2, None), (2, 14400, 8, 1, 1)]
    assert plan.close_fraction == 0.75 and plan.iteration_timeout_s == 5400 and plan.judge_timeout_s == 90
    assert plan.judge.model == "judge" and plan.judge_concurrency == 4 and plan.policy.api_key_env == "POLICY_KEY"
    # global 1-based iterations; the policy version moves by one per iteration from initial_policy_version
    assert [(s.index, it, pv) for s, it, pv in plan.schedule()] == [(1, 1, 3), (1, 2, 4), (2, 3, 5)]
    assert plan.n_iterations == 3
    minimal = parse_plan({**{k: PLAN[k] for k in ("name", "policy", "stages", "dataset")}, "tasks": {"split": "train"}})
    assert minimal.split == "train" and minimal.judge is None and minimal.close_fraction == 1.0
    assert minimal.iteration_timeout_s is None and minimal.max_concurrent_rollouts == 8
    assert minimal.train_command is None
    hooked = parse_plan({**PLAN, "train": "klong train --dataset {dataset} && reload {next_policy_version} '{{}}'"})
    assert hooked.train_command.endswith("'{{}}'") and hooked.train_timeout_s is None
    assert parse_plan({**PLAN, "train": {"command": "x", "timeout": "2h"}}).train_timeout_s == 7200


def _with(path: str, value):
    """PLAN with the value at a dotted/indexed path replaced (value None: the key removed)."""
    plan = copy.deepcopy(PLAN)
    keys = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
    node = plan
    for k in keys[:-1]:
        node = node[k]
    if value is None:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return plan


@pytest.mark.parametrize("path,value,message", [
    ("name", None, r"name is required"),
    ("name", "bad name!", r"name is required"),
    ("tasks", [], r"tasks must be a non-empty list"),
    ("tasks", ["fre", "fre"], r"tasks lists a task twice: \['fre'\]"),
    ("tasks", {"split": "eval"}, r"tasks\.split must be train"),
    ("policy", None, r"policy is required"),
    ("policy.base_url", "localhost:8000", r"policy\.base_url must be an http"),
    ("policy.model", "", r"policy\.model is required"),
    ("policy.api_key_env", "sk-123-not-a-name", r"policy\.api_key_env must name an environment variable"),
    ("policy.key", "x", r"unknown key policy\.key"),
    ("judge.concurrency", 0, r"judge\.concurrency must be an integer >= 1"),
    ("stages", [], r"stages must be a non-empty list"),
    ("stages[1].timeout", "4 hours", r"stages\[1\]\.timeout must be a duration"),
    ("stages[0].timeout", None, r"stages\[0\]\.timeout is required"),
    ("stages[0].rollouts_per_sample", 0, r"stages\[0\]\.rollouts_per_sample must be an integer >= 1"),
    ("stages[1].iterations", None, r"stages\[1\]\.iterations is required"),
    ("stages[1].samples_per_iteration", 1.5, r"stages\[1\]\.samples_per_iteration must be an integer"),
    ("stages[0].rollouts", 4, r"unknown key stages\[0\]\.rollouts"),
    ("dataset", None, r"dataset is required"),
    ("dataset.name", "web rl", r"dataset\.name: dataset name 'web rl' is not valid"),
    ("dataset.config.max_tokens", -1, r"dataset\.config: max_tokens"),
    ("dataset.config.iteration", [1], r"dataset\.config\.iteration is set by the scheduler"),
    ("dataset.config.trainer_policy_version", 2, r"dataset\.config\.trainer_policy_version is set by the scheduler"),
    ("dataset.config.max_staleness", -1, r"dataset\.config: max_staleness must be an integer >= 0"),
    ("dataset.config.typo", 1, r"dataset\.config: unknown dataset config key 'typo'"),
    ("close_fraction", 0, r"close_fraction must be a number in \(0, 1\]"),
    ("close_fraction", 1.5, r"close_fraction must be a number in \(0, 1\]"),
    ("iteration_timeout", "soon", r"iteration_timeout must be a duration"),
    ("judge_timeout", "0s", r"judge_timeout must be a positive duration"),
    ("max_concurrent_rollouts", 0, r"max_concurrent_rollouts must be an integer >= 1"),
    ("initial_policy_version", -1, r"initial_policy_version must be an integer >= 0"),
    ("agent", "fast", r"agent must be a mapping"),
    ("stage", [1], r"unknown key stage \(known: "),
    ("train", {"command": ""}, r"train\.command is required"),
    ("train", {"command": "klong train --dataset {datset}"}, r"train\.command: bad placeholder 'datset' \(known: "),
    ("train", {"command": "x", "timeout": "soon"}, r"train\.timeout must be a duration"),
    ("train", {"command": "x", "gpus": 8}, r"unknown key train\.gpus"),
])
def test_validation_errors_name_the_key(path, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_plan(_with(path, value))


def test_check_command_prints_the_schedule_and_reports_bad_files(tmp_path, capsys):
    good = tmp_path / "plan.yaml"
    good.write_text(yaml.safe_dump(PLAN))
    assert main(["rl", "check", str(good), "--home", str(tmp_path / "home")]) == 0
    out = capsys.readouterr().out
    assert "plan two-stage: tasks fre, lca" in out and "judge judge at http://127.0.0.1:8001/v1 (in-process)" in out
    assert "stage 1 iteration 2: policy v4, timeout 7200s, all samples x 4 rollouts" in out
    assert "stage 2 iteration 3: policy v5, timeout 14400s, 1 samples x 8 rollouts" in out

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("stages[1].timeout", "4 hours")))
    assert main(["rl", "check", str(bad), "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "stages[1].timeout must be a duration" in err
    (tmp_path / "list.yaml").write_text("- just\n- a list\n")
    assert main(["rl", "check", str(tmp_path / "list.yaml")]) == 2
    assert "must hold a mapping" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="No such file"):
        load_plan(tmp_path / "missing.yaml")


def test_the_servers_context_length_is_the_runners_context_limit():
    """With a managed server the runner prunes at the server's max_model_len unless the agent sets a lower limit;
    a higher one is refused (the server could not take that context)."""
    base = {**copy.deepcopy(PLAN), "serve": {"model": "smollm2", "max_model_len": 1152}}
    base.pop("policy", None)
    assert parse_plan(base).agent["context_limit"] == 1152
    assert parse_plan({**base, "serve": {"model": "smollm2"}}).agent["context_limit"] == 4096  # the server's default
    assert parse_plan({**base, "agent": {"context_limit": 1000}}).agent["context_limit"] == 1000
    with pytest.raises(ConfigError, match="context_limit 2000 is above serve.max_model_len 1152"):
        parse_plan({**base, "agent": {"context_limit": 2000}})
    assert "context_limit" not in parse_plan(copy.deepcopy(PLAN)).agent  # no managed server: nothing to derive
