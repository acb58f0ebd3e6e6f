"""The blocks of an RL plan (rl.plan) and their parsers: durations, endpoints, stages, eval, serve, train.

    parse_duration("1h30m", "iteration_timeout")    # 5400.0; ConfigError naming the key otherwise
    _stage({"timeout": "2h", "rollouts_per_sample": 4, "iterations": 2}, 0)   # Stage(1, 7200.0, 4, 2)

Each parser takes the raw (YAML) value of one block and returns its typed record, or raises ConfigError
naming the key at fault (`stages[1].timeout`) and what is wrong; unknown keys are named with the known ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from schemas.errors import ConfigError

_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
EVAL_KEYS = {"tasks", "split", "every", "rollouts_per_sample", "final"}
SERVE_KEYS = {"model", "device", "dtype", "max_model_len", "port", "kv_cache_gib", "home"}
CHECKS_JUDGE = "checks"
TRAIN_FIELDS = ("dataset", "iteration", "stage", "policy_version", "next_policy_version", "plan", "home")


def parse_duration(value: Any, key: str) -> float:
    """Seconds from a number or "2h" / "90s" / "1.5m" / "1h30m" / "500ms"; ConfigError naming `key`."""
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a duration like 90s, 1.5m or 2h, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        parts = _PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ConfigError(f"{key} must be a duration like 90s, 1.5m, 2h or 1h30m (units ms, s, m, h, d), "
                              f"got {value!r}")
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise ConfigError(f"{key} must be a duration like 90s, 1.5m or 2h, got {type(value).__name__} {value!r}")
    if not seconds > 0:
        raise ConfigError(f"{key} must be a positive duration, got {value!r}")
    return seconds


def _int(raw: dict, key: str, where: str, lo: int, default: Optional[int] = None) -> Optional[int]:
    v = raw.get(key, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(f"{where}{key} must be an integer >= {lo}, got {v!r}")
    return v


def _mapping(v: Any, key: str) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(f"{key} must be a mapping, got {type(v).__name__} {v!r}")
    return v


def _unknown(raw: dict, known: set, where: str) -> None:
    extra = sorted(set(raw) - known)
    if extra:
        raise ConfigError(f"unknown key {where}{extra[0]} (known: {', '.join(sorted(known))})")


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key_env: Optional[str] = None  # the environment variable holding the key (never the key itself)


@dataclass(frozen=True)
class Stage:
    index: int  # m, 1-based
    timeout_s: float  # T(m): every rollout started in this stage is truncated at it
    rollouts_per_sample: int  # n: the group size
    iterations: int
    samples_per_iteration: Optional[int] = None  # None: every task of the plan, each iteration


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation inside a plan run (see the module docstring)."""

    tasks: tuple[str, ...]  # explicit eval task ids; empty: every registered eval task
    every: int = 1  # evaluate at the plan's iterations 1, 1+every, 1+2*every, ...
    rollouts_per_sample: int = 1
    final: Optional[bool] = None  # after the last iteration, under the policy it produced (None: when the plan trains)

    def due(self, k: int) -> bool:
        """Whether the plan's k-th iteration (1-based) starts with an evaluation."""
        return (k - 1) % self.every == 0


def _endpoint(raw: Any, key: str, extra: set = frozenset()) -> tuple[Endpoint, dict]:
    raw = _mapping(raw, key)
    _unknown(raw, {"base_url", "model", "api_key_env"} | extra, f"{key}.")
    for k in ("base_url", "model"):
        if not isinstance(raw.get(k), str) or not raw[k].strip():
            raise ConfigError(f"{key}.{k} is required (a non-empty string)")
    if not raw["base_url"].startswith(("http://", "https://")):
        raise ConfigError(f"{key}.base_url must be an http(s) URL of an OpenAI-compatible endpoint, "
                          f"got {raw['base_url']!r}")
    env = raw.get("api_key_env")
    if env is not None and (not isinstance(env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env)):
        raise ConfigError(f"{key}.api_key_env must name an environment variable, got {env!r}")
    return Endpoint(raw["base_url"].rstrip("/"), raw["model"], env), {k: raw[k] for k in extra if k in raw}


def _stage(raw: Any, i: int) -> Stage:
    where = f"stages[{i}]."
    raw = _mapping(raw, f"stages[{i}]")
    _unknown(raw, {"timeout", "rollouts_per_sample", "iterations", "samples_per_iteration"}, where)
    if "timeout" not in raw:
        raise ConfigError(f"{where}timeout is required (e.g. 2h)")
    for k in ("rollouts_per_sample", "iterations"):
        if k not in raw:
            raise ConfigError(f"{where}{k} is required (an integer >= 1)")
    return Stage(i + 1, parse_duration(raw["timeout"], f"{where}timeout"), _int(raw, "rollouts_per_sample", where, 1),
                 _int(raw, "iterations", where, 1), _int(raw, "samples_per_iteration", where, 1))


def _eval(raw: Any) -> Optional[EvalSpec]:
    """`eval: {tasks: [ids] | split: eval, every: N, rollouts_per_sample: N, final: bool}`."""
    if raw is None:
        return None
    raw = _mapping(raw, "eval")
    _unknown(raw, EVAL_KEYS, "eval.")
    tasks, split = raw.get("tasks"), raw.get("split")
    if (tasks is None) == (split is None):
        raise ConfigError("eval needs tasks: [eval task ids] or split: eval (one of them)")
    if split is not None and split != "eval":
        raise ConfigError(f"eval.split must be eval (the held-out tasks, never trained on), got {split!r}")
    if tasks is not None:
        if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) and t for t in tasks)):
            raise ConfigError(f"eval.tasks must be a non-empty list of eval task ids, got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"eval.tasks lists a task twice: {sorted(t for t in set(tasks) if tasks.count(t) > 1)}")
    final = raw.get("final")
    if final is not None and not isinstance(final, bool):
        raise ConfigError(f"eval.final must be true or false, got {final!r}")
    return EvalSpec(tuple(tasks or ()), _int(raw, "every", "eval.", 1, 1), _int(raw, "rollouts_per_sample", "eval.", 1, 1),
                    final)


def _serve(raw: Any) -> Optional[dict]:
    """The optional managed policy server: ServeConfig fields (checked when it starts) + home."""
    if raw is None:
        return None
    raw = _mapping(raw, "serve")
    _unknown(raw, SERVE_KEYS, "serve.")
    if not isinstance(raw.get("model"), str) or not raw["model"].strip():
        raise ConfigError("serve.model is required: a model NAME under HOME/models or a transformers directory")
    if raw.get("device", "cpu") not in ("cpu", "cuda"):
        raise ConfigError(f"serve.device must be cpu or cuda, got {raw['device']!r}")
    for k in ("max_model_len", "port", "kv_cache_gib"):
        if k in raw:
            _int(raw, k, "serve.", 1)
    return dict(raw)


def _context_limit(agent: dict, serve: dict) -> dict:
    """The managed server's context length is the runner's `agent.context_limit` unless the plan sets one: the
    runner then prunes before a call the server would cut (vLLM shortens `max_tokens` to what is left, and the
    closed turn ends over the model's length). A limit above the server's is refused."""
    from services.serve import ServeConfig

    model_len = serve.get("max_model_len", ServeConfig.max_model_len)
    limit = agent.get("context_limit")
    if limit is None:
        agent["context_limit"] = model_len
    elif isinstance(limit, int) and not isinstance(limit, bool) and limit > model_len:
        raise ConfigError(f"agent.context_limit {limit} is above serve.max_model_len {model_len}: the server cannot "
                          "take that context; lower it or raise serve.max_model_len")
    return agent


def _train(raw: Any) -> tuple[Optional[str], Optional[float], Optional[str], tuple[str, ...]]:
    """(hook command, timeout, trainer config, overrides): `train: CMD`, `train: {command: CMD, timeout: 2h}`
    or `train: {config: NAME_OR_FILE, overrides: {key: value} | [key=value], timeout: 2h}`."""
    if raw is None:
        return None, None, None, ()
    raw = {"command": raw} if isinstance(raw, str) else _mapping(raw, "train")
    _unknown(raw, {"command", "timeout", "config", "overrides"}, "train.")
    timeout = parse_duration(raw["timeout"], "train.timeout") if raw.get("timeout") is not None else None
    if "config" in raw:
        if "command" in raw:
            raise ConfigError("train: give config (the loop trains and reloads) or command (a shell hook), not both")
        if not isinstance(raw["config"], str) or not raw["config"].strip():
            raise ConfigError("train.config must name a trainer YAML (a file or a shipped config like rl_tiny)")
        ov = raw.get("overrides") or {}
        if isinstance(ov, dict):
            overrides = tuple(f"{k}={_yaml_scalar(v)}" for k, v in ov.items())
        elif isinstance(ov, list) and all(isinstance(o, str) and "=" in o for o in ov):
            overrides = tuple(ov)
        else:
            raise ConfigError(f"train.overrides must be a mapping or a list of key=value, got {ov!r}")
        if any(o.split("=", 1)[0] in ("model.name", "dataset", "mode") for o in overrides):
            raise ConfigError("train.overrides may not set model.name, dataset or mode: the loop sets them")
        return None, timeout, raw["config"], overrides
    cmd = raw.get("command")
    if not isinstance(cmd, str) or not cmd.strip():
        raise ConfigError("train.command is required: a shell command, e.g. klong train --dataset {dataset} ...")
    try:
        cmd.format(**{k: "x" for k in TRAIN_FIELDS})
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"train.command: bad placeholder {e} (known: {', '.join('{' + k + '}' for k in TRAIN_FIELDS)}; "
                          "write {{ and }} for literal braces)") from None
    return cmd, timeout, None, ()


def _yaml_scalar(v: Any) -> str:
    """An override value as `key=value` text the trainer's parser reads back as the same value."""
    import json

    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)
