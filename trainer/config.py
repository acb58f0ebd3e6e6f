"""One training run's configuration: a YAML file, then `key=value` overrides, checked before anything runs.

    cfg = load_config("trainer/configs/sft_tiny.yaml", ["optim.lr=3e-4", "engine.zero_stage=2"])
    cfg.optim.lr, cfg.loss.reduction, cfg.to_dict()

Nested sections (`model`, `data`, `optim`, `engine`, `loss`, `train`, `k8s`) are frozen dataclasses;
overrides use dotted keys and YAML values (`4096` is an int, `true` a bool, `[0.9, 0.95]` a list).
Every problem is collected and raised at once as a ConfigError that names the keys at fault:
unknown keys (with the closest known one), wrong types, out-of-range values and settings that
contradict each other (`check_conflicts`). The shipped YAMLs live in `trainer/configs/`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from core.settings import read_yaml
from schemas.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
Mode = Literal["sft", "rl"]
Reduction = Literal["token", "sample", "sample_sum"]


@dataclass(frozen=True)
class ModelConfig:
    # "tiny" (random init, built in code), a local directory transformers can load (a klong checkpoint is
    # one), or NAME of a model imported with `klong model import ... --name NAME` (HOME/models/NAME)
    name: str = "tiny"
    # tiny only: Llama-style shape (max_position_embeddings = the dataset's max_tokens)
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    # the tiny stand-in only: map token ids with `id % vocab_size` (simulated datasets use a 150k vocabulary).
    # Off (and always for a real model): a token id >= the model's vocabulary is an error.
    fold_token_ids: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    policy_version: Optional[int] = None  # of the input model; default: its klong checkpoint's, else 0


@dataclass(frozen=True)
class DataConfig:
    micro_batch_tokens: int = 4096  # padded tokens (rows x longest row) per micro-batch
    shuffle: bool = True  # a new permutation per epoch, from (seed, epoch)
    verify: bool = True  # recompute the content hash before training; refuse a mismatch


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0  # 0: off


@dataclass(frozen=True)
class EngineConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    gradient_accumulation_steps: int = 1  # micro-batches per rank per optimizer step
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int = 0  # torch threads per process on CPU; 0: torch's default (OMP_NUM_THREADS)


@dataclass(frozen=True)
class LossConfig:
    # token: sum over loss tokens / loss tokens in the step; sample: mean per sample, then mean over
    # samples; sample_sum: sum per sample / samples in the step (eq. 7 as written: 1/(nK) sum_i sum_t)
    reduction: Reduction = "token"
    # How groups (rollouts of one sample, with all their windows) weigh in a step. windows: through the reduction
    # alone, so a group weighs by its windows (tokens) in the step; equal: every group of the step the same
    # (the reduction applied within each group, then the mean over the step's groups)
    group_weight: Literal["windows", "equal"] = "windows"
    clip_eps: float = 0.2  # rl: PPO clip epsilon (eq. 7)
    beta: float = 0.0  # rl: weight of KL(pi_theta || pi_ref); 0 = no reference model is loaded
    kl_estimator: Literal["k3", "full"] = "k3"  # k3: on sampled tokens; full: exact over the vocabulary
    # rl: the denominator of the ratio (eq. 8). recompute: the frozen input policy's logprobs on each window's
    # own input (a no-grad pass), so r = 1 at theta = theta_old whatever context the runner had; behaviour:
    # the logprobs stored at generation time (loss tokens without one are then left out)
    old_logprobs: Literal["recompute", "behaviour"] = "recompute"
    dual_clip: Optional[float] = 3.0  # rl: for A < 0 the surrogate is at least c * A (dual-clip PPO); null: off
    tis_cap: Optional[float] = None  # rl, recompute: weight tokens by min(pi_old / pi_behaviour, cap); null: off
    logit_chunk_tokens: int = 1024  # positions per log-prob/entropy chunk (no [b, T, V] tensor); 0: all at once


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; None: until `epochs` are done
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    log_every: int = 1  # steps between metrics events (and lines on stdout)
    # experiment trackers (TRL's names): tensorboard, mlflow, wandb, all, none; offline under RUN_DIR by default
    # (trainer/tracking.py). Every step's metrics and the run's lineage go to each one.
    report_to: Union[str, tuple[str, ...]] = ()


@dataclass(frozen=True)
class K8sConfig:
    image: str = "ghcr.io/klong/trainer:latest"
    namespace: str = "default"
    gpus: int = 1  # per pod; also the number of processes the pod's DeepSpeed launcher starts
    cpu: str = "8"
    memory: str = "64Gi"
    home_pvc: str = "klong-data"  # PersistentVolumeClaim holding the data home
    home_mount: str = "/data/klong"
    service_account: Optional[str] = None
    bootstrap_servers: Optional[str] = None  # Kafka as the pod reaches it (default: this command's, unless local)
    kafka_secret: Optional[str] = None  # Secret with KLONG_KAFKA_* (SASL/TLS) settings, passed as env
    backoff_limit: int = 0
    ttl_seconds_after_finished: int = 86400


@dataclass(frozen=True)
class RunConfig:
    mode: Optional[Mode] = None  # sft | rl (or --mode)
    dataset: Optional[str] = None  # NAME@N (or --dataset)
    seed: int = 0
    output_dir: Optional[str] = None  # default: HOME/runs/<run_id>
    lineage: bool = True  # emit training_run events (needs Kafka); false: no lineage trail
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


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


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


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
