"""DeepSpeed around the policy: ZeRO stage, micro-batches and accumulation from the run's YAML; gloo on CPU.

    dist = init_distributed(cfg)                        # rank/world from the launcher's env (local: 0 of 1)
    engine = Engine(model, cfg, dist, total_steps)
    loss = objective(engine.module, mb, norm)[0]         # trainer.objective: forward through the module's parts
    engine.backward(loss); engine.step()                 # once per micro-batch; the optimizer steps at the boundary

Every launcher runs the same DeepSpeed engine: `local` is DeepSpeed in one process (world size 1, gloo),
`deepspeed` is N processes started by the DeepSpeed launcher, `k8s` is that launcher inside a pod.
The optimizer is torch AdamW handed to DeepSpeed (no compiled ops are needed: DS_BUILD_OPS=0), with a
linear warmup then constant or cosine schedule. On CPU DeepSpeed would JIT-compile a shared-memory
all-reduce kernel at first use (~75 s of C++); plain gloo is what runs here, so that kernel is switched off.

Loss scaling: the losses are already normalized by the whole step's totals (trainer.losses.Norm), so the
engine must *sum* micro-batch gradients over ranks and accumulation steps: `backward` passes
scale_wrt_gas=False and multiplies by the world size to undo DeepSpeed's data-parallel averaging.
ZeRO partitions optimizer state (1), gradients (2) and parameters (3) across data-parallel ranks. A process
alone has nothing to partition, so world size 1 runs stage 0 whatever the YAML says: measured on SmolLM2
(bench/alignment.py (d)), stage 1 alone ran at 0.53x a plain transformers loop, stage 0 at 0.99x; and at
stage 0 alone DeepSpeed's gradient all-reduce, which would only copy every gradient into buckets and back,
is off. `Engine.zero_stage` is the stage that runs (recorded and printed by the recipe).
Checkpoints: the engine's own format (`engine.save_checkpoint`: optimizer, scheduler, ZeRO partitions)
for resuming, next to the safetensors weights (trainer.model) that everything else reads.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from trainer.config import RunConfig


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: RunConfig) -> Dist:
    """Joins the process group the launcher set up (RANK/WORLD_SIZE/... in the env); alone (local) it
    makes a group of one on a free port."""
    import deepspeed
    import deepspeed.ops

    use_cuda = cfg.engine.device == "cuda" or (cfg.engine.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo, without a 75 s JIT build
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    backend = cfg.engine.backend if cfg.engine.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    elif cfg.engine.cpu_threads:
        torch.set_num_threads(cfg.engine.cpu_threads)
    return Dist(rank, world, local, device)


def lr_lambda(warmup: int, total: Optional[int], schedule: str):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine" and total:
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    return f


class Engine:
    def __init__(self, model: torch.nn.Module, cfg: RunConfig, dist: Dist, total_steps: Optional[int]):
        import deepspeed

        o, e = cfg.optim, cfg.engine
        self.dist, self.accumulation = dist, e.gradient_accumulation_steps
        self.zero_stage = e.zero_stage if dist.world_size > 1 else 0
        # fp32 at stage 0: DeepSpeed clips but keeps no norm, so the engine clips (and keeps the norm) itself
        self.own_clip = self.zero_stage == 0 and cfg.model.dtype != "bfloat16"
        self.grad_clip, self._grad_norm = o.grad_clip, float("nan")
        model.to(dist.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, total_steps, o.schedule))
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,  # rows vary by micro-batch (token budget); DeepSpeed only counts
            "gradient_accumulation_steps": e.gradient_accumulation_steps,
            "gradient_clipping": 0.0 if self.own_clip else o.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,  # torch AdamW: no compiled DeepSpeed optimizer on CPU
            "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
            "steps_per_print": 1 << 62,
            "wall_clock_breakdown": False,
        }
        self.ds, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                             lr_scheduler=scheduler, config=ds_config)
        if dist.world_size == 1:
            self.ds.enable_backward_allreduce = False  # nothing to reduce alone (~5% of a SmolLM2 step on CPU)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def step(self) -> None:
        """After each micro-batch; DeepSpeed steps the optimizer (and scheduler) every `accumulation` calls."""
        if self.own_clip and self.ds.is_gradient_accumulation_boundary():  # gradients are whole (reduced) here
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                                   self.grad_clip if self.grad_clip > 0 else math.inf))
        self.ds.step()

    def grad_norm(self) -> float:
        """The 2-norm of the last optimizer step's gradients (before clipping)."""
        if self.own_clip:
            return self._grad_norm
        n = self.ds.get_global_grad_norm()
        return float(n) if n is not None else float("nan")

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def full_state_dict(self) -> Optional[dict]:
        """Whole (unpartitioned) weights on rank 0; ZeRO-3 gathers them (a collective: every rank calls)."""
        if self.ds.zero_optimization_stage() == 3:
            return self.ds._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict() if self.dist.main else None

    def save(self, directory: Path) -> None:
        """Optimizer/scheduler/ZeRO state for resuming (every rank writes its partition)."""
        self.ds.save_checkpoint(str(directory), tag="engine", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag="engine", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no engine state in {directory}/engine")
