"""Before a training run: where it writes, the checks that need no torch, and finding its checkpoints.

    manifest = preflight(settings, cfg)          # ConfigError naming the key at fault, before any process starts
    run_dir_for(settings, cfg, run_id)           # output_dir (default HOME/runs) / run_id
    latest_checkpoint(run_dir)                   # RUN_DIR/checkpoints/step-<N> with the highest N that is complete

`preflight` checks the config's required keys, the dataset version (fetched from a bucket archive if only
there) and its kind against the mode, the model name, the trackers, the longest sample against the
micro-batch budget, and (lineage) that Kafka is configured: a bad run fails before a process is launched.
"""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings
from schemas.errors import ConfigError
from store import datasets as ds
from trainer.config import RunConfig

CHECKPOINTS = "checkpoints"


def run_dir_for(settings: Settings, cfg: RunConfig, run_id: str) -> Path:
    return Path(cfg.output_dir or settings.home / "runs") / run_id


def preflight(settings: Settings, cfg: RunConfig) -> dict:
    """Checks that need no model: required keys, the dataset version, mode vs its kind, sample lengths
    vs data.micro_batch_tokens. Returns the dataset manifest."""
    missing = [k for k in ("mode", "dataset") if getattr(cfg, k) is None]
    if missing:
        raise ConfigError("bad training config: " + ", ".join(f"{k} is required (--{k} or {k}: in the YAML)"
                                                              for k in missing))
    manifest = ds.load_manifest(settings.home, cfg.dataset, archive=settings.archive)  # fetched from a bucket
    if cfg.mode == "rl" and manifest["kind"] != "rl":
        raise ConfigError(f"mode=rl needs an rl dataset (advantages, behaviour logprobs), but dataset "
                          f"{manifest['ref']} is kind {manifest['kind']}: build one with --kind rl or use mode=sft")
    from trainer.config import model_path

    model_path(cfg.model.name, settings.home)  # ConfigError naming model.name when it is nowhere
    longest = ds_longest(settings, manifest)
    from trainer.tracking import check_installed, resolve_report_to

    check_installed(resolve_report_to(cfg.train.report_to))  # a tracker that is not here fails now, not after setup
    if longest > cfg.data.micro_batch_tokens:
        raise ConfigError(f"data.micro_batch_tokens={cfg.data.micro_batch_tokens} is below the longest sample of "
                          f"{manifest['ref']} ({longest} tokens; its max_tokens is {manifest['config']['max_tokens']})")
    if cfg.lineage:
        try:
            settings.bootstrap()
        except ConfigError as e:
            raise ConfigError(f"lineage=true sends training_run events to Kafka: {e}; or set lineage=false to "
                              "train without a lineage trail") from e
    return manifest


def ds_longest(settings: Settings, manifest: dict) -> int:
    """The longest sample of a version (samples.parquet `n_tokens`, one small column)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = ds.version_dir(settings.home, manifest["name"], manifest["version"]) / ds.SAMPLES
    return int(pc.max(pq.read_table(path, columns=["n_tokens"]).column(0)).as_py() or 0)


def latest_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory -> its newest complete checkpoint."""
    from trainer.model import STATE_FILE

    if (path / STATE_FILE).is_file():
        return path
    done = sorted((p for p in (path / CHECKPOINTS).glob("step-*") if (p / STATE_FILE).is_file()), key=read_step)
    if not done:
        raise ConfigError(f"--resume {path}: neither a checkpoint nor a run directory with one")
    return done[-1]


def read_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])
