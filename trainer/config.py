"""One training run's configuration: a YAML file, then `key=value` overrides, checked before anything runs.

    cfg = load_config("trainer/configs/sft_tiny.yaml", ["optim.lr=3e-4", "engine.zero_stage=2"])
    cfg.optim.lr, cfg.loss.reduction, cfg.to_dict()

Nested sections (`model`, `data`, `optim`, `engine`, `loss`, `train`, `k8s`) are frozen dataclasses;
overrides use dotted keys and YAML values (`4096` is an int, `true` a bool, `[0.9, 0.95]` a list).
Every problem is collected and raised at once as a ConfigError that names the keys at fault:
unknown keys (with the closest known one), wrong types, out-of-range values and settings that
contradict each other (`check_conflicts`). The shipped YAMLs live in `trainer/configs/`.
The sections themselves (`RunConfig` and its parts) are trainer.config_sections; this module re-exports them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from core.settings import read_yaml
from schemas.errors import ConfigError
from trainer.config_sections import (DataConfig, EngineConfig, K8sConfig, LossConfig, Mode, ModelConfig, OptimConfig,
                                     Reduction, RunConfig, TrainConfig)

CONFIG_DIR = Path(__file__).parent / "configs"
__all__ = ["CONFIG_DIR", "RANGES", "DataConfig", "EngineConfig", "K8sConfig", "LossConfig", "Mode", "ModelConfig",
           "OptimConfig", "Reduction", "RunConfig", "TrainConfig", "check_conflicts", "config_path", "dump_yaml",
           "from_dict", "load_config", "model_path", "parse_overrides", "shipped_configs"]

# Value ranges: key -> (test, what it must be).
RANGES = {
    "seed": (lambda v: v >= 0, ">= 0"),
    "model.vocab_size": (lambda v: v >= 2, ">= 2"), "model.hidden_size": (lambda v: v >= 1, ">= 1"),
    "model.intermediate_size": (lambda v: v >= 1, ">= 1"), "model.layers": (lambda v: v >= 1, ">= 1"),
    "model.heads": (lambda v: v >= 1, ">= 1"), "model.kv_heads": (lambda v: v >= 1, ">= 1"),
    "model.policy_version": (lambda v: v is None or v >= 0, ">= 0"),
    "data.micro_batch_tokens": (lambda v: v >= 1, ">= 1"),
    "optim.lr": (lambda v: v > 0, "> 0"), "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "optim.eps": (lambda v: v > 0, "> 0"), "optim.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "optim.grad_clip": (lambda v: v >= 0, ">= 0"),
    "engine.zero_stage": (lambda v: v in (0, 1, 2, 3), "0, 1, 2 or 3"),
    "engine.gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "engine.cpu_threads": (lambda v: v >= 0, ">= 0"),
    "loss.clip_eps": (lambda v: 0 < v < 1, "in (0, 1)"), "loss.beta": (lambda v: v >= 0, ">= 0"),
    "loss.dual_clip": (lambda v: v > 1, "> 1 (or null: off)"), "loss.tis_cap": (lambda v: v > 0, "> 0 (or null: off)"),
    "loss.logit_chunk_tokens": (lambda v: v >= 0, ">= 0"),
    "train.epochs": (lambda v: v >= 1, ">= 1"), "train.max_steps": (lambda v: v is None or v >= 1, ">= 1"),
    "train.save_every": (lambda v: v >= 0, ">= 0"), "train.log_every": (lambda v: v >= 1, ">= 1"),
    "k8s.gpus": (lambda v: v >= 0, ">= 0"), "k8s.backoff_limit": (lambda v: v >= 0, ">= 0"),
}


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """(fits, value converted): ints pass as floats, lists as tuples; bools are never numbers."""
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp), value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return True, None
        return next(((True, v) for ok, v in (_type_ok(value, a) for a in get_args(tp) if a is not type(None)) if ok),
                    (False, value))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]: any length
            if not isinstance(value, (list, tuple)):
                return False, value
            out = [_type_ok(v, args[0]) for v in value]
            return all(ok for ok, _ in out), tuple(v for _, v in out)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, value
        out = [_type_ok(v, a) for v, a in zip(value, args)]
        return all(ok for ok, _ in out), tuple(v for _, v in out)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-5` (no dot) as a string: take it as the number it is
            try:
                value = float(value) if math.isfinite(float(value)) else value
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str) and value != "", value
    return isinstance(value, tp), value


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(map(str, get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}s"
        return f"a list of {len(get_args(tp))} numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string"}.get(tp, str(tp))


def _build(cls: type, data: dict, prefix: str, errors: list[str]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            errors.append(f"{path}: unknown key" + (f" (did you mean {prefix}{close[0]}?)" if close else
                                                  f" (known: {', '.join(sorted(known))})"))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{path}: must be a mapping of {tp.__name__} keys, got {value!r}")
                continue
            kwargs[key] = _build(tp, value, f"{path}.", errors)
            continue
        ok, value = _type_ok(value, tp)
        if not ok:
            errors.append(f"{path}: must be {_describe(tp)}, got {value!r}")
            continue
        rule = RANGES.get(path)
        if rule and value is not None and not rule[0](value):
            errors.append(f"{path}: must be {rule[1]}, got {value!r}")
            continue
        kwargs[key] = value
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """["optim.lr=3e-4", ...] -> nested dict; values parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"{item!r}: overrides are key=value (e.g. optim.lr=3e-4)")
        try:
            _set(tree, key, yaml.safe_load(value))
        except yaml.YAMLError as e:
            raise ConfigError(f"{item!r}: value is not valid YAML: {e}") from e
    return tree


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(data: dict) -> RunConfig:
    errors: list[str] = []
    cfg = _build(RunConfig, data, "", errors)
    if not errors:
        errors = check_conflicts(cfg)
    if errors:
        raise ConfigError("bad training config:\n  " + "\n  ".join(errors))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = (), **flags: Any) -> RunConfig:
    """YAML file, then overrides, then command-line flags (`mode`, `dataset`); a flag that contradicts the
    file or an override is an error naming both."""
    data = _merge(read_yaml(path) if path else {}, parse_overrides(list(overrides)))
    for key, flag in flags.items():
        if flag is None:
            continue
        if data.get(key) not in (None, flag):
            raise ConfigError(f"--{key} {flag} conflicts with {key}: {data[key]} in the config/overrides")
        data[key] = flag
    return from_dict(data)


def check_conflicts(cfg: RunConfig) -> list[str]:
    """Settings that are each valid but contradict each other (named by key)."""
    errors = []
    m, loss = cfg.model, cfg.loss
    tiny = m.name == "tiny"
    if tiny and m.heads % m.kv_heads:
        errors.append(f"model.heads ({m.heads}) must be a multiple of model.kv_heads ({m.kv_heads})")
    if tiny and m.hidden_size % m.heads:
        errors.append(f"model.hidden_size ({m.hidden_size}) must be a multiple of model.heads ({m.heads})")
    if cfg.mode == "sft" and loss.beta > 0:
        errors.append(f"loss.beta={loss.beta} is the RL KL weight, but mode is sft (set loss.beta=0 or mode=rl)")
    if cfg.engine.zero_stage == 3 and cfg.mode == "rl" and (loss.beta > 0 or loss.old_logprobs == "recompute"):
        errors.append("engine.zero_stage=3 with loss.beta>0 or loss.old_logprobs=recompute: the frozen input policy "
                      "is not partitioned; use zero_stage <= 2, or loss.beta=0 and loss.old_logprobs=behaviour")
    if loss.tis_cap is not None and loss.old_logprobs != "recompute":
        errors.append(f"loss.tis_cap={loss.tis_cap} weights recomputed old logprobs against the behaviour ones, but "
                      "loss.old_logprobs is behaviour (set loss.old_logprobs=recompute or loss.tis_cap=null)")
    try:
        from trainer.tracking import resolve_report_to

        resolve_report_to(cfg.train.report_to)
    except ConfigError as e:
        errors.append(str(e))
    if cfg.train.max_steps is not None and cfg.optim.warmup_steps > cfg.train.max_steps:
        errors.append(f"optim.warmup_steps ({cfg.optim.warmup_steps}) > train.max_steps ({cfg.train.max_steps})")
    return errors


def model_path(name: str, home: Path | str) -> Optional[Path]:
    """model.name -> the directory to load: None for tiny; else a local directory, or NAME of a model that
    `klong model import ... --name NAME` put under HOME/models. Anything else is a ConfigError."""
    if name == "tiny":
        return None
    from trainer.model_import import resolve_model_dir

    try:
        return resolve_model_dir(name, Path(home))
    except ConfigError as e:
        raise ConfigError(f"model.name: {e} (or model.name=tiny); nothing is downloaded") from e


def config_path(value: str | Path | None) -> str | None:
    """`--config` as given: a YAML file, or the name of a shipped one (`sft_tiny` -> trainer/configs/sft_tiny.yaml)."""
    if value is None or Path(value).exists():
        return None if value is None else str(value)
    value = str(value)
    shipped = CONFIG_DIR / (value if value.endswith(".yaml") else f"{value}.yaml")
    return str(shipped) if shipped.is_file() else value  # a missing file is reported by read_yaml


def shipped_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
