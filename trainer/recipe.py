"""The training recipe (torchtune style): setup -> train -> save_checkpoint -> cleanup, one YAML per run.

    klong train --dataset web-sft@2 --mode sft --config sft_tiny optim.lr=3e-4 train.report_to=[tensorboard]
    python -m trainer.recipe --home H --run-dir H/runs/<id> --run-id <id>     # what each launched process runs

`preflight` checks everything that needs no torch (config, dataset exists and suits the mode, sample
length vs the micro-batch budget) so a bad run fails before a process is launched. Each process then:

setup     process group (trainer.engine), dataset version (trainer.data: verified content hash), model
          (trainer.model; for RL with recomputed old logprobs or beta > 0 a frozen copy: the input policy),
          DeepSpeed engine, the resume position, and (rank 0) the lineage events (trainer.lineage).
train     per optimizer step: this rank's micro-batches, loss (trainer.objective, trainer.losses) normalized
          by the step's global totals, backward, DeepSpeed step; metrics summed over ranks; a line per
          `log_every` on stdout, a `metrics` event and a line in RUN_DIR/steps.jsonl (with the sample keys);
          every step to the experiment trackers of `train.report_to` (trainer.tracking), lineage as their tags.
save      RUN_DIR/checkpoints/step-<N>/ (step-30, no zero padding): a transformers directory vLLM serves
          (model.safetensors, config.json, tokenizer files and chat template of the input model; the next
          run's `model.name`), klong_state.json (run, step, policy_version, dataset + hash, data position),
          engine/ (optimizer/ZeRO state for resume). Written to a temp name, renamed when whole.
cleanup   `ended` event, outbox flushed, process group left as is (the local launcher may run again).

Each checkpoint is a new policy: policy_version = the input model's + 1 per checkpoint of the lineage.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from core.settings import Settings, read_yaml
from schemas.errors import ConfigError
from trainer.config import RunConfig, dump_yaml, from_dict
from trainer.preflight import CHECKPOINTS, ds_longest, latest_checkpoint, preflight, read_step, run_dir_for

log = logging.getLogger("klong.trainer")
__all__ = ["CHECKPOINTS", "TrainRecipe", "ds_longest", "latest_checkpoint", "main", "preflight", "read_step", "run",
           "run_dir_for"]


class TrainRecipe:
    def __init__(self, settings: Settings, cfg: RunConfig, run_id: str, run_dir: Path,
                 resume: Optional[Path] = None, out=None):
        self.settings, self.cfg, self.run_id, self.run_dir = settings, cfg, run_id, Path(run_dir)
        self.resume, self.out = resume, out
        self.events = None
        self.tracker = None
        self.step = 0
        self.checkpoints: list[Path] = []

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch

        from trainer.data import BatchPlan, DatasetReader, Position
        from trainer.engine import Engine, init_distributed
        from trainer.model import check_tokenizer, load_model, read_state
        from trainer.objective import Objective

        _quiet_libraries()
        cfg = self.cfg
        manifest = preflight(self.settings, cfg)
        self.dist = init_distributed(cfg)
        torch.manual_seed(cfg.seed)
        model, self.model_info = load_model(cfg.model, manifest["config"]["max_tokens"], seed=cfg.seed,
                                            home=self.settings.home)
        check_tokenizer(self.model_info, manifest)
        self.rl = cfg.mode == "rl"
        recompute = self.rl and cfg.loss.old_logprobs == "recompute"
        self.reader = DatasetReader(self.settings.home, cfg.dataset, verify=cfg.data.verify and self.dist.main,
                                    vocab_size=self.model_info.vocab_size, fold_token_ids=cfg.model.fold_token_ids,
                                    need_behaviour=not recompute, archive=self.settings.archive)
        self.ref = None
        if self.rl and (cfg.loss.beta > 0 or recompute):  # frozen: the input policy (eq. 7's pi_ref, theta_old)
            import copy

            self.ref = copy.deepcopy(model).to(self.dist.device).eval().requires_grad_(False)
        self.objective = Objective(cfg, self.rl, self.ref)
        accumulation = cfg.engine.gradient_accumulation_steps
        self.plan = BatchPlan(self.reader, cfg.data.micro_batch_tokens, seed=cfg.seed, shuffle=cfg.data.shuffle,
                              rank=self.dist.rank, world_size=self.dist.world_size, accumulation=accumulation,
                              group_weight=cfg.loss.group_weight, reduction=cfg.loss.reduction)
        per_epoch = self.plan.steps_in_epoch(0)
        self.total_steps = self.plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
        self.engine = Engine(model, cfg, self.dist, self.total_steps)
        self.position, self.policy_version = Position(), self.model_info.policy_version
        self.policy_version_in = self.model_info.policy_version
        if self.resume:
            state = read_state(self.resume)
            if state["dataset_hash"] != self.reader.content_hash:
                raise ConfigError(f"--resume {self.resume}: it trained on {state['dataset']} ({state['dataset_hash'][:19]}"
                                  f"...), not on {self.reader.ref} ({self.reader.content_hash[:19]}...)")
            self.engine.load(self.resume)
            self.step, self.position = state["step"], Position(**state["position"])
            self.policy_version, self.policy_version_in = state["policy_version"], state["policy_version_in"]
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            if cfg.lineage:
                from trainer.lineage import RunEvents

                self.events = RunEvents(self.settings, self.run_dir, self.run_id)
                self.events.started(dataset=self.reader.ref, dataset_hash=self.reader.content_hash, mode=cfg.mode,
                                    policy_version_in=self.policy_version_in, step=self.step,
                                    config={**cfg.to_dict(), "run_dir": str(self.run_dir),
                                            "world_size": self.dist.world_size, "zero_stage_run": self.engine.zero_stage,
                                            "resumed_from": str(self.resume) if self.resume else None})
            self._open_tracker()
            self._say(f"run {self.run_id}: {cfg.mode} on {self.reader.ref} ({len(self.reader)} samples, "
                      f"{per_epoch} steps/epoch), {self.dist.world_size} process(es), ZeRO-{self.engine.zero_stage}, "
                      f"{self.total_steps} steps" + (f", resumed at step {self.step}" if self.resume else ""))

    def _open_tracker(self) -> None:
        """The experiment trackers of `train.report_to` (trainer.tracking), with the run's lineage as tags."""
        from trainer.tracking import Tracker

        cfg = self.cfg
        tags = {"run_id": self.run_id, "mode": cfg.mode, "dataset": self.reader.ref,
                "dataset_hash": self.reader.content_hash, "policy_version_in": self.policy_version_in,
                "model": cfg.model.name, "world_size": self.dist.world_size,
                "resumed_from": str(self.resume) if self.resume else None}
        self.tracker = Tracker.open(cfg.train.report_to, self.run_dir, name=self.run_id, tags=tags,
                                    config=cfg.to_dict())
        if self.tracker.backends:
            self._say(f"tracking: {self.tracker.where()}")

    # ---- train ----------------------------------------------------------------------------------

    def train(self, after_step: Optional[Callable[[dict], None]] = None) -> dict:
        """The run's steps; `after_step(metrics)` (optional) runs after each one, outside its timing
        (bench/alignment.py interleaves a peer's steps with it)."""
        import torch

        from trainer.losses import Norm

        cfg = self.cfg
        last: dict = {}
        steps = self.plan.steps(self.position, cfg.train.epochs)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            step = next(steps, None)
            if step is None:
                break
            t_read = time.perf_counter() - t0
            lr = self.engine.lr()  # the rate this step uses (the scheduler moves on after it)
            norm = Norm(cfg.loss.reduction, step.totals.loss_tokens, step.totals.samples)
            keys = ("loss", *self.objective.sum_keys)
            sums, maxes = torch.zeros(len(keys), dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
            for mb in step.micro_batches:
                loss, stats, mx = self.objective(self.engine.module, mb, norm)
                sums += torch.tensor([float(loss.detach())] + [stats[k] for k in keys[1:]], dtype=torch.float64)
                maxes = torch.maximum(maxes, torch.tensor([mx.get("ratio_max", 0.0)], dtype=torch.float64))
                self.engine.backward(loss)
                self.engine.step()
            if self.dist.world_size > 1:
                torch.distributed.all_reduce(sums)
                torch.distributed.all_reduce(maxes, op=torch.distributed.ReduceOp.MAX)
            sums = dict(zip(keys, sums.tolist()))
            self.step += 1
            self.position = step.position
            dt = time.perf_counter() - t0
            m = {"loss": sums["loss"], "lr": lr, "grad_norm": self.engine.grad_norm(),
                 "epoch": float(step.epoch), "samples": float(step.totals.samples),
                 "tokens": float(step.totals.tokens), "loss_tokens": float(step.totals.loss_tokens),
                 "step_s": dt, "reader_s": t_read, "reader_share": t_read / dt,
                 "tokens_per_s": step.totals.tokens / dt,
                 "no_logprob_tokens": float(self.reader.n_no_logprob[step.samples].sum())}
            m.update(self.objective.metrics(sums, {"ratio_max": maxes.item()}, step.totals.loss_tokens))
            if self.rl:
                m["adv_mean"] = float(self.reader.advantage[step.samples].mean())
            last = m
            if self.dist.main:
                self._log_step(step, m)
            if cfg.train.save_every and self.step % cfg.train.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            if after_step is not None:
                after_step(m)
        if not self.checkpoints or read_step(self.checkpoints[-1]) != self.step:
            self.save_checkpoint()
        return last

    def _log_step(self, step, m: dict) -> None:
        keys = [self.reader.sample_key(j) for j in step.samples.tolist()]
        with open(self.run_dir / "steps.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **m, "sample_keys": keys}) + "\n")
        if self.tracker:
            self.tracker.log(self.step, m)
        if self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps:
            extra = (f" pg {m['pg_loss']:.4f} kl {m.get('kl', 0.0):.4f} clip {m['clip_frac']:.3f} ratio "
                     f"{m['ratio_mean']:.4f} (max {m['ratio_max']:.3f}) entropy {m['entropy']:.3f}" +
                     (f" mismatch {m['mismatch']:.2e}" if "mismatch" in m else "") if self.rl
                     else f" nll {m['nll']:.4f}")
            self._say(f"step {self.step}/{self.total_steps} loss {m['loss']:.4f}{extra} lr {m['lr']:.2e} "
                      f"grad {m['grad_norm']:.3f} {m['tokens_per_s']:.0f} tok/s reader {100 * m['reader_share']:.2f}%")
            if self.events:
                self.events.metrics(self.step, m)

    # ---- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        from trainer.model import save_weights, write_state

        final = self.run_dir / CHECKPOINTS / f"step-{self.step}"
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(self.dist)
        self.engine.save(tmp)
        weights = self.engine.full_state_dict()
        self.policy_version += 1
        if self.dist.main:
            save_weights(self.engine.module, tmp, state_dict=weights, source=self.model_info.source)
            write_state(tmp, {"run_id": self.run_id, "step": self.step, "policy_version": self.policy_version,
                              "policy_version_in": self.policy_version_in, "dataset": self.reader.ref,
                              "dataset_hash": self.reader.content_hash, "mode": self.cfg.mode,
                              "position": self.position.to_dict(), "world_size": self.dist.world_size,
                              "stand_in": self.model_info.stand_in,
                              "config": self.cfg.to_dict()})
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            if self.events:
                self.events.checkpoint(self.step, policy_version=self.policy_version, path=final,
                                       dataset=self.reader.ref, dataset_hash=self.reader.content_hash)
            if self.tracker:
                self.tracker.set_tags({"policy_version_out": self.policy_version, "checkpoint": str(final),
                                       "checkpoint_step": self.step})
            self._say(f"checkpoint {final} (policy_version {self.policy_version})")
        _barrier(self.dist)
        self.checkpoints.append(final)
        return final

    # ---- cleanup --------------------------------------------------------------------------------

    def cleanup(self, status: str = "finished", metrics: Optional[dict] = None) -> None:
        if self.tracker:
            self.tracker.close(status)
            self.tracker = None
        if self.events:
            self.events.ended(self.step, status=status,
                              policy_version_out=self.policy_version if self.checkpoints else None,
                              metrics={k: v for k, v in (metrics or {}).items() if isinstance(v, float)})
            self.events.close()
            self.events = None

    def _say(self, msg: str) -> None:
        print(msg, file=self.out or sys.stdout, flush=True)


def _barrier(dist) -> None:
    import torch

    if dist.world_size > 1:
        torch.distributed.barrier()


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def run(settings: Settings, cfg: RunConfig, run_id: str, run_dir: Path, resume: Optional[Path] = None,
        out=None) -> dict:
    """setup -> train -> cleanup in this process; returns the last step's metrics."""
    recipe = TrainRecipe(settings, cfg, run_id, run_dir, resume, out)
    status, metrics = "failed", {}
    try:
        recipe.setup()
        metrics = recipe.train()
        status = "finished"
        return metrics
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        recipe.cleanup(status, metrics)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of each launched process (the DeepSpeed launcher runs `-m trainer.recipe`)."""
    p = argparse.ArgumentParser(prog="python -m trainer.recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", required=True)
    p.add_argument("--bootstrap-servers")
    p.add_argument("--topic-prefix")
    p.add_argument("--run-dir", required=True, help="holds config.yaml (the resolved run config)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--resume", help="checkpoint directory to continue from")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)
    run_dir = Path(args.run_dir)
    cfg = from_dict(read_yaml(run_dir / "config.yaml"))
    try:
        run(settings, cfg, args.run_id, run_dir, Path(args.resume) if args.resume else None)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: the launching `klong train` says what was kept
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
