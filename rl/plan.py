"""The progressive-RL plan: a YAML file `klong rl run PLAN.yaml` executes (`rl.scheduler`).

    plan = load_plan("two-stage.yaml")     # RlPlan, or ConfigError naming the key at fault
    klong rl check two-stage.yaml          # the same from the command line: prints the schedule

    name: two-stage                  # names the plan's facts in `rl_iterations`
    tasks: [fre, lca]                # registered train task ids, or {split: train} for every train task
    policy: {base_url: http://127.0.0.1:8000/v1, model: policy, api_key_env: POLICY_API_KEY}
    judge: {base_url: http://judge:8000/v1, model: gpt-oss-120b}   # optional: judge in-process
    stages:                          # T(1) < T(2) < ...: the rollout timeout grows stage by stage
      - {timeout: 2h, rollouts_per_sample: 4, iterations: 2}
      - {timeout: 4h, rollouts_per_sample: 4, iterations: 2, samples_per_iteration: 8}
    dataset: {name: web-rl, config: {max_tokens: 32768, overlap_turns: 2, max_staleness: 1}}
    max_concurrent_rollouts: 16      # rollouts running at once (a thread each)
    close_fraction: 1.0              # an iteration closes once this fraction of its rollouts ended ...
    iteration_timeout: 3h            # ... or this long after it started (optional)
    judge_timeout: 30m               # after close: wait this long for the archive and the judge
    initial_policy_version: 0        # the policy of iteration 1; +1 per iteration
    agent: {min_time_fraction: 0.5}  # producers.agent.AgentConfig fields for every rollout
    serve: {model: smollm2, device: cpu}   # optional: a managed vLLM policy server (services.serve); policy: then optional
    train:                           # optional, after each iteration's dataset (blocks the next iteration)
      config: rl_smollm2             # train the served checkpoint on it (klong train), then reload the server
      overrides: {train.max_steps: 1}
      timeout: 2h
    # or a shell hook instead of config: `train: {command: "klong train ... && ./reload.sh {next_policy_version}"}`
    eval: {split: eval, every: 1, rollouts_per_sample: 2}   # optional: held-out rollouts under the current policy
    judge: checks                    # rubric leaves graded by their `check` commands only (no judge model)

Durations are seconds (a number) or text like "90s", "1.5m", "2h", "1h30m", "500ms". Every error names
the key (`stages[1].timeout`) and what is wrong. The scheduler owns `iteration` and
`trainer_policy_version` of the dataset config (one version per iteration), so the plan may not set them.
The train hook's placeholders: {dataset} (NAME@N), {iteration}, {stage}, {policy_version} (the policy that
acted), {next_policy_version}, {plan}, {home}; values are shell-quoted.

`eval:` (optional): every `every` iterations (the 1st, the 1+every-th, ...) `rollouts_per_sample` rollouts
of each eval task (`tasks: [ids]` of registered eval tasks, or `split: eval` for all of them) run under the
policy of that iteration, beside its training rollouts, at eval priority in the judge queue; with `final:
true` (the default when the plan trains) once more after the last iteration under the policy it produced.
They are never trained on (eval tasks never enter a training dataset) and never carried over: the weights
change only after they ended. Their group ids are `PLAN:eval:i<iteration>:<task>`; `rl_evals` and the
`eval_*` columns of `rl_iterations` read them.

`serve:` keys (services.serve.ServeConfig): model (NAME under HOME/models or a directory), device (cpu | cuda),
dtype (default float32 on cpu, bfloat16 on cuda), max_model_len (also the runner's `agent.context_limit` unless
the agent block sets a lower one), port, kv_cache_gib, and home (the data home whose server to use; default the
run's own). `train.config` (a trainer YAML or a shipped name) with
`overrides` (a mapping or a list of `key=value`) needs `serve:`: each iteration trains from the checkpoint
being served (model.name is set by the loop) and reloads the server with the new one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rl.plan_blocks import (CHECKS_JUDGE, EVAL_KEYS, SERVE_KEYS, TRAIN_FIELDS, Endpoint, EvalSpec, Stage,
                            _context_limit, _endpoint, _eval, _int, _mapping, _serve, _stage, _train, _unknown,
                            parse_duration)
from schemas.errors import ConfigError

_OWNED_DATASET_KEYS = ("iteration", "trainer_policy_version", "stage")
TOP_KEYS = {"name", "tasks", "policy", "judge", "stages", "dataset", "max_concurrent_rollouts", "close_fraction",
            "iteration_timeout", "judge_timeout", "initial_policy_version", "agent", "train", "serve", "eval"}
__all__ = ["CHECKS_JUDGE", "EVAL_KEYS", "SERVE_KEYS", "TOP_KEYS", "TRAIN_FIELDS", "Endpoint", "EvalSpec", "RlPlan",
           "Stage", "agent_config", "load_plan", "parse_duration", "parse_plan"]


@dataclass(frozen=True)
class RlPlan:
    name: str
    tasks: tuple[str, ...]  # explicit task ids; empty with split set: every registered task of that split
    split: Optional[str]
    policy: Endpoint
    judge: Optional[Endpoint]
    stages: tuple[Stage, ...]
    dataset_name: str
    dataset_config: dict
    max_concurrent_rollouts: int = 8
    close_fraction: float = 1.0
    iteration_timeout_s: Optional[float] = None
    judge_timeout_s: float = 1800.0
    initial_policy_version: int = 0
    agent: dict = field(default_factory=dict)
    judge_concurrency: int = 8
    train_command: Optional[str] = None  # shell command run after each iteration's dataset is built
    train_timeout_s: Optional[float] = None
    train_config: Optional[str] = None  # trainer YAML (file or shipped name): the loop trains and reloads
    train_overrides: tuple[str, ...] = ()  # key=value
    serve: Optional[dict] = None  # ServeConfig fields (+ home): the managed policy server
    eval: Optional[EvalSpec] = None  # held-out evaluation under the current policy

    @property
    def trains(self) -> bool:
        return self.train_config is not None or self.train_command is not None

    @property
    def final_eval(self) -> bool:
        """An evaluation after the last iteration, under the policy it produced."""
        return self.eval is not None and (self.eval.final if self.eval.final is not None else self.trains)

    @property
    def checks_only(self) -> bool:
        """`judge: checks`: leaves graded by their commands, no judge model."""
        return self.judge is not None and self.judge.model == CHECKS_JUDGE and not self.judge.base_url

    @property
    def n_iterations(self) -> int:
        return sum(s.iterations for s in self.stages)

    def schedule(self) -> list[tuple[Stage, int, int]]:
        """(stage, k, policy_version) for the plan's k-th iteration (1-based, across stages), in order. A run
        numbers its iterations after the highest iteration already in the archive (k on a fresh one)."""
        out, it = [], 1
        for st in self.stages:
            for _ in range(st.iterations):
                out.append((st, it, self.initial_policy_version + it - 1))
                it += 1
        return out


def parse_plan(raw: Any, source: str = "plan") -> RlPlan:
    """A plan mapping (parsed YAML) -> RlPlan; ConfigError naming the key at fault."""
    from consumers.materialize import DatasetConfig
    from store.datasets import check_name

    raw = _mapping(raw, source)
    _unknown(raw, TOP_KEYS, "")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise ConfigError(f"name is required: letters, digits, '.', '_' and '-' (got {name!r})")
    tasks, split = raw.get("tasks"), None
    if isinstance(tasks, dict):
        _unknown(tasks, {"split"}, "tasks.")
        split = tasks.get("split")
        if split != "train":
            raise ConfigError(f"tasks.split must be train (eval tasks never enter a training dataset), got {split!r}")
        tasks = ()
    elif isinstance(tasks, list) and tasks and all(isinstance(t, str) and t for t in tasks):
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"tasks lists a task twice: {sorted(t for t in set(tasks) if tasks.count(t) > 1)}")
        tasks = tuple(tasks)
    else:
        raise ConfigError(f"tasks must be a non-empty list of task ids or {{split: train}}, got {tasks!r}")
    serve = _serve(raw.get("serve"))
    if "policy" in raw:
        policy, _ = _endpoint(raw["policy"], "policy")
    elif serve is not None:  # the managed server's URL is known once it runs
        policy = Endpoint("", "policy")
    else:
        raise ConfigError("policy is required: {base_url: URL, model: NAME} of the OpenAI-compatible policy endpoint "
                          "(or serve: {model: ...} for a managed vLLM server)")
    if raw.get("judge") == CHECKS_JUDGE:
        judge, judge_extra = Endpoint("", CHECKS_JUDGE), {}
    else:
        judge, judge_extra = _endpoint(raw["judge"], "judge", {"concurrency"}) if raw.get("judge") is not None else (None, {})
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("stages must be a non-empty list of {timeout, rollouts_per_sample, iterations}")
    parsed = tuple(_stage(s, i) for i, s in enumerate(stages))
    ds = _mapping(raw.get("dataset"), "dataset") if "dataset" in raw else None
    if ds is None:
        raise ConfigError("dataset is required: {name: NAME, config: {max_tokens: ..., ...}}")
    _unknown(ds, {"name", "config"}, "dataset.")
    try:
        check_name(ds.get("name"))
    except ConfigError as e:
        raise ConfigError(f"dataset.name: {e}") from None
    cfg = dict(_mapping(ds.get("config") or {}, "dataset.config"))
    owned = [k for k in _OWNED_DATASET_KEYS if k in cfg]
    if owned:
        raise ConfigError(f"dataset.config.{owned[0]} is set by the scheduler (one version per iteration); remove it")
    try:
        DatasetConfig.from_mapping({**cfg, "iteration": [1], "trainer_policy_version": 0})
    except ConfigError as e:
        raise ConfigError(f"dataset.config: {e}") from None
    close = raw.get("close_fraction", 1.0)
    if isinstance(close, bool) or not isinstance(close, (int, float)) or not 0 < close <= 1:
        raise ConfigError(f"close_fraction must be a number in (0, 1], got {close!r}")
    agent = _mapping(raw.get("agent") or {}, "agent")
    train_command, train_timeout, train_config, train_overrides = _train(raw.get("train"))
    if train_config and serve is None:
        raise ConfigError("train.config needs serve: the loop trains the served checkpoint and reloads the server "
                          "(without a managed server use train.command, a shell hook)")
    if serve is not None:
        agent = _context_limit(dict(agent), serve)
    return RlPlan(
        name=name, tasks=tasks, split=split, policy=policy, judge=judge, stages=parsed,
        dataset_name=ds["name"], dataset_config=cfg,
        max_concurrent_rollouts=_int(raw, "max_concurrent_rollouts", "", 1, 8),
        close_fraction=float(close),
        iteration_timeout_s=(parse_duration(raw["iteration_timeout"], "iteration_timeout")
                             if raw.get("iteration_timeout") is not None else None),
        judge_timeout_s=parse_duration(raw.get("judge_timeout", 1800), "judge_timeout"),
        initial_policy_version=_int(raw, "initial_policy_version", "", 0, 0),
        agent=dict(agent), judge_concurrency=_int(judge_extra, "concurrency", "judge.", 1, 8),
        train_command=train_command, train_timeout_s=train_timeout, train_config=train_config,
        train_overrides=train_overrides, serve=serve, eval=_eval(raw.get("eval")))


def load_plan(path: str | Path) -> RlPlan:
    """Reads and validates a plan YAML file; errors name the file and the key."""
    from core.settings import read_yaml

    try:
        return parse_plan(read_yaml(path), str(path))
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(("--config", str(path))) else f"{path}: {msg}") from None


def agent_config(plan: RlPlan):
    """The plan's `agent:` mapping as producers.agent.AgentConfig (unknown fields named)."""
    from dataclasses import fields

    from producers.agent import AgentConfig

    known = {f.name for f in fields(AgentConfig)}
    extra = sorted(set(plan.agent) - known)
    if extra:
        raise ConfigError(f"unknown key agent.{extra[0]} (AgentConfig fields: {', '.join(sorted(known))})")
    try:
        return AgentConfig(**plan.agent)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"agent: {e}") from None
