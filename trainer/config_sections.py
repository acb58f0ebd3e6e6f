"""The sections of a training run's configuration: frozen dataclasses with their defaults and meanings.

    RunConfig(mode="sft", dataset="web-sft@1").optim.lr      # 1e-3
    cfg.replace(seed=1).to_dict()                           # plain dicts and lists, as YAML writes them

Sections: `model`, `data`, `optim`, `engine`, `loss`, `train`, `k8s`. Loading, overrides and every check
(types, ranges, conflicting settings) are trainer.config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

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


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
