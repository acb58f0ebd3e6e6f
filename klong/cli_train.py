"""`klong train` and `klong lineage`: train on a dataset version, and trace a checkpoint back to its events.

    klong train --dataset web-sft@2 --config sft_tiny [optim.lr=3e-4 ...]   # mode from the config (or --mode)
    klong train --dataset web-sft@2 --config sft_tiny --launcher deepspeed --nproc 2
    klong train --dataset web-rl@3 --mode rl --config rl_tiny --launcher k8s --dry-run k8s.gpus=8 ...
    klong train --resume HOME/runs/<run_id> [train.max_steps=60]      # its own config.yaml, latest checkpoint
    klong lineage HOME/runs/<run_id>/checkpoints/step-30

The first line on stdout is `RUN_DIR=HOME/runs/<run_id>`: the run's directory (config.yaml, steps.jsonl,
checkpoints/step-<N>/, the experiment trackers' files). `--config` takes a YAML file or the name of a
shipped one (sft_tiny, rl_tiny for the tiny stand-in model; sft_smollm2, rl_smollm2 for SmolLM2); `key=value`
overrides use dotted keys (`engine.zero_stage=2`, `train.report_to=[tensorboard,mlflow,wandb]`). The config
is checked before anything starts; every problem is reported at once, naming the keys. `--dry-run` prints
what would run (k8s: the manifest YAML). The run's lineage events reach SQL (`training_runs`) once a sink
archives them (see --wait-archived). Ctrl-C stops the run and says which checkpoint is kept."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import sys
from pathlib import Path

from klong.cli import IntermixedParser
from schemas.errors import ConfigError, TransientError


def _settings(args):
    from core.settings import Settings

    return Settings.load(args.home, args.bootstrap_servers, args.topic_prefix)


def _config_path(value: str | None) -> str | None:
    from trainer.config import config_path

    return config_path(value)


def new_run_id(dataset: str, mode: str) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{dataset.replace('@', '-v')}-{mode}-{stamp}-{secrets.token_hex(2)}"


def cmd_train(args) -> int:
    from trainer import launch
    from trainer.config import dump_yaml, load_config
    from trainer.model import read_state
    from trainer.preflight import latest_checkpoint, preflight, run_dir_for

    settings = _settings(args)
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if args.launcher == "local" and args.nproc not in (None, 1):
        raise ConfigError(f"--nproc {args.nproc} needs --launcher deepspeed (or k8s); local is one process")
    resume = latest_checkpoint(Path(args.resume)) if args.resume else None
    if resume:  # the run's own config (RUN_DIR/config.yaml) unless another is given; overrides still apply
        state = read_state(resume)
        if args.run_id and args.run_id != state["run_id"]:
            raise ConfigError(f"--run-id {args.run_id} conflicts with --resume {resume} (run {state['run_id']})")
        run_id, run_dir = state["run_id"], resume.parent.parent
        path = _config_path(args.config) if args.config else run_dir / "config.yaml"
        cfg = load_config(path, args.overrides, mode=args.mode, dataset=args.dataset)
    else:
        cfg = load_config(_config_path(args.config), args.overrides, mode=args.mode, dataset=args.dataset)
        if cfg.mode is None or cfg.dataset is None:
            preflight(settings, cfg)  # names what is missing
        run_id = args.run_id or new_run_id(cfg.dataset, cfg.mode)
        run_dir = run_dir_for(settings, cfg, run_id)

    if args.launcher == "k8s":
        if cfg.mode is None or cfg.dataset is None:
            preflight(settings, cfg)
        objs = launch.k8s_manifest(settings, cfg, run_id, args.nproc, resume)
        if args.dry_run:
            print(launch.to_yaml(objs), end="")
            return 0
        return launch.submit(objs)

    preflight(settings, cfg)
    if args.dry_run:
        print(f"# run {run_id} in {run_dir}" + (f", resuming {resume}" if resume else ""))
        if args.launcher == "deepspeed":
            cmd = launch.deepspeed_command(settings, run_id, run_dir, args.nproc or 1, 29500, resume)
            print("# " + " ".join(cmd))
        print(dump_yaml(cfg), end="")
        return 0
    print(f"RUN_DIR={run_dir}", flush=True)  # first line on stdout: `head -1 | cut -d= -f2-` gives the run directory
    _quiet_cpu_accelerator(cfg)
    try:
        if args.launcher == "deepspeed":
            rc = launch.launch_deepspeed(settings, cfg, run_id, run_dir, args.nproc or 1, resume)
        else:
            rc = launch.launch_local(settings, cfg, run_id, run_dir, resume)
    except KeyboardInterrupt:
        print(f"klong train: interrupted. {_kept(run_dir)}", file=sys.stderr)
        return 130
    if rc == 0:
        print(f"run {run_id} done: {run_dir}")
        if cfg.lineage:
            _await_archive(settings, args.wait_archived)
    return rc


def _quiet_cpu_accelerator(cfg) -> None:
    """On a machine without CUDA, tell DeepSpeed it runs on CPU (else it prints a warning guessing so)."""
    import os

    if "DS_ACCELERATOR" in os.environ or cfg.engine.device == "cuda":
        return
    import torch

    if cfg.engine.device == "cpu" or not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _await_archive(settings, wait_s: float | None) -> None:
    """The run's training_run events reach SQL (`training_runs`) once a sink archives them. With --wait-archived,
    wait up to that long for a running sink; without it, wait while a sink is seen making progress on the
    training topic, else say what to run. (Only the training topic counts: rollouts other producers keep
    recording, as in an RL loop, must not hold a run's exit.)"""
    import time

    from schemas.errors import KlongError
    from store.status import partition_lag

    def lag() -> int:
        return sum(p.lag for p in partition_lag(settings) if p.topic == settings.topics.training)

    try:
        left, now = lag(), time.monotonic()
        deadline = now + (wait_s if wait_s is not None else 5.0)
        cap = now + (wait_s if wait_s is not None else 120.0)
        while left and time.monotonic() < min(deadline, cap):  # a running sink flushes every second or so
            time.sleep(0.5)
            seen = lag()
            if seen < left and wait_s is None:
                deadline = time.monotonic() + 5.0  # it moves: a sink is running, keep waiting
            left = seen
    except KlongError as e:
        print(f"note: could not check the archive ({e}); the run's events reach SQL once `klong sink run` "
              "archives them", file=sys.stderr)
        return
    if left and wait_s is not None:
        raise TransientError(f"--wait-archived {wait_s:g}: {left} of the run's events are still not archived "
                             "(is `klong sink run` running?); the run itself finished")
    if left:
        print("note: the run's training_run events are in Kafka, not in the archive yet: `klong sink run "
              "--until-idle` archives them (SQL: training_runs); no sink was seen running", file=sys.stderr)


def _kept(run_dir: Path) -> str:
    """What an interrupted run left behind, and how to go on."""
    from trainer.preflight import latest_checkpoint

    try:
        last = latest_checkpoint(run_dir)
    except ConfigError:
        return f"No checkpoint was saved yet in {run_dir}; start the run again."
    return f"Kept: checkpoint {last} (the newest complete one; later steps are lost). Resume: klong train --resume {run_dir}"


def cmd_lineage(args) -> int:
    from trainer.lineage import trace

    s = _settings(args)
    t = trace(s.home, Path(args.checkpoint), archive=s.archive)
    if args.json:
        print(json.dumps(t, indent=2))
        return 0
    ok = "matches" if t["hash_ok"] else "DOES NOT MATCH (the dataset version changed since)"
    print(f"checkpoint {args.checkpoint}\n  run {t['run_id']}, step {t['step']}, policy_version {t['policy_version']}")
    print(f"  dataset {t['dataset']} {t['dataset_hash']} ({ok} the manifest)")
    print(f"  input: {len(t['flushes'])} archive flush directories; Kafka offsets " +
          ", ".join(f"{k} {'+'.join(f'{a}..{b}' for a, b in v)}" for k, v in sorted(t["watermark"].items())))
    print(f"  its events: klong sql \"SELECT * FROM step_events WHERE {t['events_where']}\"")
    return 0


def register(sub, common) -> None:
    """Adds `train` and `lineage` to the `klong` parser."""
    t = sub.add_parser("train", parents=[common], help="train on a dataset version (sft | rl), locally, with "
                       "DeepSpeed, or as a Kubernetes Job", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.__class__ = IntermixedParser  # the parser class comes from klong.cli's subparsers; only this one intermixes
    t.add_argument("--dataset", help="NAME@N (NAME alone: its latest version)")
    t.add_argument("--mode", choices=["sft", "rl"], help="sft: eq. 6; rl: eq. 7 (PPO clip + KL)")
    t.add_argument("--config", help="run YAML, or a shipped one by name: sft_smollm2, rl_smollm2 "
                   "for the real model, sft_tiny, rl_tiny for the tiny stand-in")
    t.add_argument("--launcher", choices=["local", "deepspeed", "k8s"], default="local",
                   help="local: this process; deepspeed: --nproc processes here; k8s: a Job (default local)")
    t.add_argument("--nproc", type=int, help="processes (deepspeed) or GPUs per pod (k8s, overrides k8s.gpus)")
    t.add_argument("--dry-run", action="store_true", help="check and print what would run (k8s: the manifest)")
    t.add_argument("--resume", help="a checkpoint, or a run directory (its latest checkpoint)")
    t.add_argument("--wait-archived", type=float, nargs="?", const=600.0, metavar="SECONDS",
                   help="after training, wait (default up to 600 s) until a running `klong sink run` has archived the "
                        "run's events, so `training_runs` shows it; without it, klong train waits only while it sees "
                        "a sink archiving, else says to run `klong sink run --until-idle`")
    t.add_argument("--run-id", help=argparse.SUPPRESS)  # launchers pass the run id down (k8s pod)
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys, YAML values)")
    t.set_defaults(func=cmd_train)

    li = sub.add_parser("lineage", parents=[common], help="checkpoint -> run -> dataset version -> its events")
    li.add_argument("checkpoint", help="a checkpoint directory (RUN_DIR/checkpoints/step-N)")
    li.add_argument("--json", action="store_true", help="the whole lineage as JSON")
    li.set_defaults(func=cmd_lineage)
