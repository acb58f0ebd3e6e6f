"""The closed loop of a progressive-RL plan run: the managed policy server, training every iteration from
the checkpoint being served, the weight reload, and where an interrupted run resumes.

    loop = PolicyLoop(settings, plan, say)                 # plan.serve: {model, device, dtype, ...}
    endpoint = loop.start(loop.base_checkpoint(), pv)       # vLLM (services.serve) healthy, serving that checkpoint
    step = loop.advance("web-rl@3", n_samples, it, pv, check)   # klong train from the served checkpoint, reload
    step.checkpoint, step.train_s, step.reload.method      # the weights pv+1 is served from

Training is the real `klong train` (a child process: its memory goes back when it exits, and its
`training_run` events carry the lineage) on the iteration's dataset version with the plan's trainer config,
`model.name` = the checkpoint being served; its newest checkpoint is then loaded into the running server
in place (`PolicyServer.reload`: pause, reload the weights, resume; a restart only if that fails). An
iteration whose dataset has no samples trains nothing: the same weights are served as the next
policy_version (`reload_method` skipped).

Resume: `resume_point` reads the plan's `rl_iteration` facts from the archive: how many iterations of the
plan's schedule finished (trained, or built when the plan does not train) across its earlier runs, and
the checkpoint the last one produced, so `klong rl run` on the same plan after a Ctrl-C starts at the next
iteration with the policy it left.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from services import serve
from core.procs import run_supervised
from core.settings import Settings
from rl.plan import RlPlan
from schemas.errors import ConfigError, TerminalError


@dataclass
class LoopStep:
    checkpoint: str
    train_run: Optional[str]
    train_s: float
    reload: Optional[serve.ReloadResult]  # None: nothing trained, the same weights serve the next version

    @property
    def reload_method(self) -> str:
        return self.reload.method if self.reload else "skipped"

    @property
    def reload_s(self) -> float:
        return self.reload.seconds if self.reload else 0.0


@dataclass(frozen=True)
class ResumePoint:
    done: int  # iterations of the plan's schedule finished by earlier runs
    checkpoint: Optional[str]  # the weights the last finished iteration produced (None: the base model)


def resume_point(settings: Settings, plan: RlPlan) -> ResumePoint:
    """What earlier runs of this plan finished, from its archived `rl_iteration` events."""
    from store.catalog import Catalog, sql_str

    trains = plan.train_config is not None or plan.train_command is not None
    finished = "('trained')" if trains else "('dataset_built', 'trained')"
    rows = Catalog(settings).arrow(
        f"SELECT run_id, iteration, checkpoint, produced_at FROM rl_iteration_events WHERE plan = {sql_str(plan.name)} "
        f"AND phase IN {finished} ORDER BY produced_at").to_pylist()
    seen: dict = {}
    for r in rows:  # one per (run, iteration): a resent event is the same fact
        seen[(r["run_id"], r["iteration"])] = r
    ckpts = [r["checkpoint"] for r in seen.values() if r["checkpoint"]]
    return ResumePoint(len(seen), ckpts[-1] if ckpts else None)


class PolicyLoop:
    """The plan's managed policy server and its training step (see the module docstring)."""

    def __init__(self, settings: Settings, plan: RlPlan, say: Callable[[str], None]):
        from trainer.model_import import resolve_model_dir

        if plan.serve is None:
            raise ConfigError(f"plan {plan.name}: no serve: section, so there is no policy server to manage")
        self.settings, self.plan, self.say = settings, plan, say
        fields = {k: v for k, v in plan.serve.items() if k != "home"}
        fields["model"] = str(resolve_model_dir(fields["model"], settings.home))
        self.config = serve.ServeConfig(**fields)
        self.serve_home = Path(plan.serve.get("home") or settings.home)
        self.server: Optional[serve.PolicyServer] = None

    def base_checkpoint(self) -> str:
        return self.config.model

    def start(self, checkpoint: str, policy_version: int):
        """Starts (or finds running) the server and makes it serve `checkpoint` as `policy_version`;
        returns the agent's PolicyEndpoint for it."""
        from producers.agent_policy import PolicyEndpoint

        t0 = time.monotonic()
        existing = serve.PolicyServer.from_home(self.serve_home)
        if not (existing and existing.alive()):
            self.say(f"starting the policy server (vLLM, {self.config.device}, {self.config.resolved_dtype()}) for "
                     f"{self.config.model}; log {self.serve_home / 'serve.log'}")
        self.server = serve.start(Settings(home=self.serve_home), self.config, policy_version)
        if Path(self.server.state.checkpoint) != Path(checkpoint).resolve():
            r = self.server.reload(checkpoint, policy_version)
            self.say(f"policy server: {r.method} to {checkpoint} in {r.seconds:.2f}s")
        elif self.server.state.policy_version != policy_version:
            self.server.set_version(policy_version)
        self.say(f"policy server {self.server.base_url} serving {self.server.state.checkpoint} as policy "
                 f"v{policy_version} ({time.monotonic() - t0:.1f}s)")
        return PolicyEndpoint(self.server.base_url, self.server.model_name)

    def advance(self, dataset: str, n_samples: int, iteration: int, policy_version: int,
                check: Callable[[], None]) -> LoopStep:
        """Trains policy_version+1 from the served checkpoint on `dataset` and serves it."""
        current = self.server.state.checkpoint
        if n_samples == 0:
            self.say(f"iteration {iteration}: {dataset} has no samples: nothing to train; the same weights serve "
                     f"policy v{policy_version + 1}")
            self.server.set_version(policy_version + 1)
            return LoopStep(current, None, 0.0, None)
        run_id = f"{self.plan.name}-i{iteration}-v{policy_version + 1}-{secrets.token_hex(2)}"
        t0 = time.monotonic()
        checkpoint = self._train(dataset, current, run_id, check)
        train_s = time.monotonic() - t0
        self.say(f"iteration {iteration}: trained {checkpoint} in {train_s:.1f}s; reloading the policy server")
        result = self.server.reload(checkpoint, policy_version + 1)
        self.say(f"iteration {iteration}: {result.method} in {result.seconds:.2f}s: policy v{policy_version + 1} served"
                 + (f" ({result.reason})" if result.reason else ""))
        return LoopStep(str(checkpoint), run_id, train_s, result)

    def _train(self, dataset: str, checkpoint: str, run_id: str, check: Callable[[], None]) -> Path:
        from trainer.config import CONFIG_DIR, load_config
        from trainer.preflight import latest_checkpoint, run_dir_for

        plan, cfg_name = self.plan, self.plan.train_config
        path = cfg_name if Path(cfg_name).exists() else str(CONFIG_DIR / (cfg_name if cfg_name.endswith(".yaml")
                                                                         else f"{cfg_name}.yaml"))
        overrides = [f"model.name={checkpoint}", *plan.train_overrides]
        run_dir = run_dir_for(self.settings, load_config(path, overrides, mode="rl", dataset=dataset), run_id)
        cmd = [sys.executable, "-m", "klong", "train", "--dataset", dataset, "--mode", "rl", "--config", path,
               "--run-id", run_id, "--home", str(self.settings.home), *overrides]
        env = {**os.environ, "KLONG_HOME": str(self.settings.home), "KLONG_BOOTSTRAP_SERVERS": self.settings.bootstrap(),
               "KLONG_TOPIC_PREFIX": self.settings.topics.prefix}
        self.say(f"training: klong train --dataset {dataset} --config {cfg_name} --run-id {run_id} "
                 + " ".join(overrides))
        status = run_supervised(cmd, env=env, timeout_s=plan.train_timeout_s, check=check,
                                what=f"training (run {run_id})")
        if status != 0:
            raise TerminalError(f"training exited with status {status}: run {run_id} in {run_dir}")
        return latest_checkpoint(run_dir)
