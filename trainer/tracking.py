"""Experiment trackers: a run's metrics and lineage in TensorBoard, MLflow and Weights & Biases, offline by default.

    tracker = Tracker.open(["tensorboard", "mlflow"], run_dir, name=run_id, tags={"dataset": "web-sft@1", ...},
                           config=cfg.to_dict())
    tracker.log(step, {"loss": 1.2, "lr": 3e-4})          # -> "train/loss", "train/lr" at that step
    tracker.set_tags({"policy_version_out": 1}); tracker.close("finished")

`train.report_to` takes TRL's names (`tensorboard`, `mlflow`, `wandb`; `all`: the three; `none` or `[]`:
off). Where each one writes, unless its own environment variable says otherwise:

| name | writes | look at it |
|---|---|---|
| tensorboard | RUN_DIR/tensorboard (event files; lineage as text) | `tensorboard --logdir HOME/runs` |
| mlflow | file store RUN_DIR/mlruns (`MLFLOW_TRACKING_URI` to use a server; experiment `MLFLOW_EXPERIMENT_NAME`, default klong) | `mlflow ui --backend-store-uri RUN_DIR/mlruns` |
| wandb | offline run under RUN_DIR/wandb (`WANDB_MODE=online` to upload live; project `WANDB_PROJECT`, default klong) | `wandb sync RUN_DIR/wandb/offline-run-*` |

Lineage (dataset NAME@N, its content hash, policy versions in and out, mode, model) goes where each tracker
keeps run metadata: TensorBoard text summaries under `lineage/`, MLflow tags (and the config as params), W&B
config and tags. The ids of the MLflow and W&B runs are kept in RUN_DIR/trackers.json, so a resumed run
(`klong train --resume`, the next iteration of an RL plan) goes on in the same tracker run.
A tracker that fails while a run trains is reported once and dropped: a full disk or a lost tracking server
does not end a 12-hour run; one that cannot start (not installed, bad URI) fails the run before training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from schemas.errors import ConfigError

log = logging.getLogger("klong.trainer")
REPORTERS = ("tensorboard", "mlflow", "wandb")
INSTALL = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny (or mlflow)", "wandb": "wandb"}
IDS_FILE = "trackers.json"


def resolve_report_to(value: Any) -> tuple[str, ...]:
    """`report_to` as written (a name, a list, `all`, `none`) -> the trackers, in REPORTERS order."""
    names = [value] if isinstance(value, str) else list(value or ())
    if "all" in names:
        names = list(REPORTERS)
    names = [n for n in names if n != "none"]
    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise ConfigError(f"train.report_to: unknown tracker {', '.join(map(repr, bad))} (known: "
                          f"{', '.join(REPORTERS)}, all, none)")
    return tuple(n for n in REPORTERS if n in names)


def check_installed(names: Iterable[str]) -> None:
    """ConfigError naming each tracker that does not import here, and what to install."""
    import importlib.util

    module = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
    missing = [n for n in names if importlib.util.find_spec(module[n]) is None]
    if missing:
        raise ConfigError("train.report_to: " + ", ".join(f"{n} is not installed (pip install {INSTALL[n]})"
                                                          for n in missing) + "; or leave it out of report_to")


class _TensorBoard:
    def __init__(self, run_dir: Path, name: str, tags: dict, config: dict, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.where = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.where))
        self.set_tags(tags)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()  # readable while the run goes on

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.writer.add_text(f"lineage/{k}", str(v), 0)

    def close(self, status: str) -> None:
        self.writer.add_text("lineage/status", status, 0)
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, name: str, tags: dict, config: dict, ids: dict):
        # MLflow 3 refuses its file store unless asked for it; a local directory is what "offline" means here
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.where = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.where)
        if ids.get("mlflow"):  # a resumed run goes on in its MLflow run
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "klong")
            found = self.client.get_experiment_by_name(experiment)
            eid = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(eid, run_name=name).info.run_id
            from mlflow.entities import Param

            flat = _flatten(config)  # params are write-once: only a new run gets them
            params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        ids["mlflow"] = self.run_id
        self.set_tags(tags)

    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{prefix}/{k}", v, now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def close(self, status: str) -> None:
        self.set_tags({"status": status})
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))


class _Wandb:
    def __init__(self, run_dir: Path, name: str, tags: dict, config: dict, ids: dict):
        import wandb

        self.where = run_dir / "wandb"
        self.where.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False, disable_git=True)
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(run_dir),
                              project=os.environ.get("WANDB_PROJECT", "klong"), name=name, id=ids.get("wandb"),
                              resume="allow" if ids.get("wandb") else None, config={**config, **_lineage_keys(tags)},
                              tags=_wandb_tags(tags), settings=settings, reinit="create_new")
        ids["wandb"] = self.run.id

    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict) -> None:
        self.run.config.update(_lineage_keys(tags), allow_val_change=True)
        self.run.tags = tuple(dict.fromkeys((*self.run.tags, *_wandb_tags(tags))))

    def close(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "finished" else 1)


BACKENDS: dict[str, Callable[..., Any]] = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}


class Tracker:
    """The trackers of one run (rank 0 only). Every method is a no-op when `report_to` is empty."""

    def __init__(self, backends: dict[str, Any], run_dir: Path, prefix: str):
        self.backends, self.run_dir, self.prefix = backends, run_dir, prefix

    @classmethod
    def open(cls, report_to: str | Iterable[str], run_dir: Path, *, name: str, tags: dict, config: dict,
             prefix: str = "train") -> "Tracker":
        names = resolve_report_to(report_to if isinstance(report_to, str) else list(report_to))
        check_installed(names)
        run_dir = Path(run_dir)
        ids_path = run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        backends: dict[str, Any] = {}
        if names:
            run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for n in names:
                backends[n] = BACKENDS[n](run_dir, name, tags, config, ids)
        except Exception as e:  # noqa: BLE001 (any tracker's own error): close the others, fail before training
            for b in backends.values():
                b.close("failed")
            raise ConfigError(f"train.report_to: {n} could not start: {type(e).__name__}: {e}") from e
        if ids:
            ids_path.write_text(json.dumps(ids))
        return cls(backends, run_dir, prefix)

    def where(self) -> str:
        """One line: where each tracker writes."""
        return ", ".join(f"{n} {b.where}" for n, b in self.backends.items())

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._each("log", step, numbers, self.prefix)

    def set_tags(self, tags: dict) -> None:
        self._each("set_tags", {k: v for k, v in tags.items() if v is not None})

    def close(self, status: str = "finished") -> None:
        self._each("close", status)
        self.backends = {}

    def _each(self, method: str, *args: Any) -> None:
        for n, b in list(self.backends.items()):
            try:
                getattr(b, method)(*args)
            except Exception as e:  # noqa: BLE001: a tracker's failure must not end the training run
                log.warning("tracker %s failed (%s: %s); the run goes on without it (steps.jsonl and the "
                            "training_run events still have every step)", n, type(e).__name__, e)
                del self.backends[n]


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _lineage_keys(tags: dict) -> dict:
    """W&B config keys `lineage/<key>`: flat, so a resumed run's updates merge key by key."""
    return {f"lineage/{k}": v for k, v in tags.items() if v is not None}


def _wandb_tags(tags: dict) -> list[str]:
    """W&B tags are short strings (at most 64 characters): `key:value` for the short lineage values."""
    return [f"{k}:{v}" for k, v in tags.items() if v is not None and len(f"{k}:{v}") <= 64]


# ---- the RL loop: one point per iteration ---------------------------------------------------------------


def loop_report_to(plan) -> tuple[str, ...]:
    """The trackers of an RL plan's loop: its trainer config's `train.report_to` (train: {config, overrides}),
    else KLONG_REPORT_TO (comma-separated names; for plans whose training is a shell hook)."""
    if plan.train_config:
        from trainer.config import config_path, load_config

        return resolve_report_to(load_config(config_path(plan.train_config), list(plan.train_overrides)).train.report_to)
    return resolve_report_to([n.strip() for n in os.environ.get("KLONG_REPORT_TO", "").split(",") if n.strip()])


def iteration_metrics(home: Path, summary) -> dict[str, float]:
    """An iteration's rewards (from the dataset version it built: per rollout, the Q of its last window; per
    window, Q and the advantage) and its counts and timings (`rl.iteration.IterationSummary`)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from store import datasets as ds

    m: dict[str, float] = {"samples": summary.n_samples, "judged": summary.judged,
                           "judge_missing": summary.judge_missing, "started": summary.started,
                           "carried_in": summary.carried_in, "carried_out": len(summary.carried_out),
                           "rolling_s": summary.rolling_s, "judge_wait_s": summary.judge_wait_s,
                           "build_s": summary.build_s, "train_s": summary.train_s, "reload_s": summary.reload_s}
    m.update({f"ended_{k}": v for k, v in summary.ended.items()})
    if summary.dataset:
        manifest = ds.load_manifest(home, summary.dataset)
        t = pq.read_table(ds.version_dir(home, manifest["name"], manifest["version"]) / ds.SAMPLES,
                          columns=["rollout_id", "window_idx", "q", "advantage"])
        if t.num_rows:
            last = {}  # rollout -> (window_idx, q) of its last window
            for rid, w, q in zip(*(t.column(c).to_pylist() for c in ("rollout_id", "window_idx", "q"))):
                if q is not None and (rid not in last or w > last[rid][0]):
                    last[rid] = (w, q)
            scores = [q for _, q in last.values()]
            if scores:
                m.update(reward_mean=sum(scores) / len(scores), reward_min=min(scores), reward_max=max(scores),
                         solved_frac=sum(s >= 1.0 for s in scores) / len(scores), rewarded_rollouts=len(scores))
            q = t.column("q").drop_null()
            if len(q):
                m["window_q_mean"] = pc.mean(q).as_py()
                m["advantage_abs_mean"] = pc.mean(pc.abs(t.column("advantage").drop_null())).as_py()
    return m


def log_iteration(settings, plan, summary, run_id: str) -> Optional[Path]:
    """One point per iteration (step = the iteration number) in HOME/runs/rl-<plan>'s trackers: rewards,
    counts, timings; lineage tags (plan, dataset, policy version, the checkpoint it trained). Returns the
    tracker directory, or None when the plan reports to no tracker."""
    names = loop_report_to(plan)
    if not names:
        return None
    run_dir = settings.home / "runs" / f"rl-{plan.name}"
    tracker = Tracker.open(names, run_dir, name=f"rl-{plan.name}", prefix="rl",
                           tags={"plan": plan.name, "loop_run_id": run_id}, config={"plan": plan.name})
    try:
        tracker.log(summary.iteration, {**iteration_metrics(settings.home, summary), "stage": summary.stage,
                                        "policy_version": summary.policy_version})
        tracker.set_tags({f"iteration_{summary.iteration}_dataset": summary.dataset,
                          f"iteration_{summary.iteration}_checkpoint": summary.checkpoint,
                          "last_iteration": summary.iteration, "policy_version": summary.policy_version})
    finally:
        tracker.close("finished")
    return run_dir
