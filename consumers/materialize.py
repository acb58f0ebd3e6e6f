"""Archive -> dataset version: steps -> turns -> sub-trajectories -> rewards -> advantages -> Parquet.

    klong dataset build web-rl --kind rl --config rl.yaml max_tokens=32768     # prints web-rl@N
    >>> build_version(settings.home, "web-rl", "rl", {"max_tokens": 32768}, archive=settings.archive)

The splitting, reward and advantage rules are `consumers.split`, `consumers.rewards` and
`consumers.advantages` (DESIGN.md "Semantics the tests hold the code to"); this module decides which
events enter and moves the tokens. It reads an explicit *input set* (a list of archive flush
directories, optionally restricted to Kafka offset ranges) so a version can be rebuilt from exactly
the events it was built from (`consumers.replay`). Two passes, both through DuckDB over the Parquet files:

1. plan (small columns only: ids, roles, pins, `len(token_ids)`): every decision is made here, per
   rollout with numpy, then advantages over the whole dataset. Memory ~ O(steps), no token values.
2. tokens: rollouts in batches of ~`batch_tokens`, ordered by where they sit in the archive so a
   batch reads few files; the steps the kept windows use are fetched (a join on file + row number),
   laid out flat per rollout and streamed into `tokens.parquet` (`store.datasets`).

Which events enter (each exclusion counted in the manifest's `drops`, by reason, never an error):
- a rollout needs `rollout_started`; its task must be registered and every registration of it must
  say split = train (`eval_task`, `unknown_task`); asking for an eval task in `tasks=` is an error;
- no `rollout_ended` (or resumed after its last end): PENDING, left out and listed in `pending`;
- status not in `statuses` (default finished, timeout: error/aborted runs are not trained on);
- stage / iteration / tasks filters (the rollout's stage and iteration after its last resume);
- events archived twice (same event_id) are read once; two different events for one
  (rollout_id, step_idx) keep the first by produced_at (then Kafka offset), counted `duplicate_step`;
- steps are sorted by step_idx, so arrival order does not matter; a gap in step_idx (or fewer steps
  than `rollout_ended.n_steps`) leaves the rollout out (`step_gap`);
- `consumers.split` drops (prefix_too_long, turn_too_long, trailing_observations, no_turns);
  `windows=context` cuts a window per recorded generation context (`consumers.split.split_contexts`);
  rollouts it cannot apply to are split greedily, counted in `counts.context_fallback_rollouts`;
- rl: windows without a valid judge result (`unrewarded`), judge results for rollouts never started
  (`judge_unknown_rollout`); several results for one step: the latest valid (produced_at, offset) wins;
- a step of the rollout holds a URL of its task's blacklist (`store.blacklist`): `blacklisted`;
- `max_staleness`: windows whose policy_version (the oldest policy that acted in the window) is more
  than that many versions behind the trainer (`trainer_policy_version`, default: the newest
  policy_version in the dataset) are left out (`stale`);
- `drop_constant_groups`: groups whose windows all have the same Q (`constant_group`).
Group baselines (rl): a group also holds the rewarded windows of its rollouts that ended in an *earlier*
iteration than `iteration` selects. A rollout carried over into iteration i ends there, while its siblings
(same group_id) ended in i - 1: the `iteration=[i]` build reads the siblings' steps and judge results from
the same input set and puts their Q in the group's mean (baseline only: not trained, not stored); rollouts
of later iterations never join, so rebuilding iteration i - 1 gives the advantages its first build gave. The Q comes from the
log (judge results), not from the earlier dataset version, so a version stays a pure function of its input
set (replay gives the same hash). The manifest counts `groups`, `single_member_groups` (all windows from
one rollout: A = 0 under reward_mode=final), `single_member_windows` and `baseline_windows`.
Steps without token_ids (text-only imports) are tokenized with `tokenizer` (default "bytes").
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from consumers.dataset_config import DatasetConfig
from consumers.dataset_inputs import INPUT_TYPES, ROLLOUTS_SQL, STEPS_SQL, InputSet, connect
from consumers.dataset_plan import Plan, plan
from consumers.dataset_tokens import FETCH_SQL, fetch_batch, samples_table, same_context
from consumers.split import DROP_UNITS
from core.tokenize import load_tokenizer
from schemas.errors import ConfigError
from schemas.events import SCHEMA_VERSION
from store import datasets as ds
from store import datasets_s3
from store.archive_cache import cache_dir
from core.objstore import S3Location, is_s3

# Re-exported: callers import these from consumers.materialize.
__all__ = ["KINDS", "INPUT_TYPES", "UNITS", "BATCH_TOKENS", "DatasetConfig", "InputSet", "STEPS_SQL", "ROLLOUTS_SQL",
           "Plan", "plan", "same_context", "FETCH_SQL", "materialize", "BuildOutcome", "build_version"]

KINDS = ("sft", "rl")
UNITS = {**DROP_UNITS, "step_gap": "rollouts", "no_rollout_started": "rollouts", "eval_task": "rollouts",
         "unknown_task": "rollouts", "stage_filter": "rollouts", "iteration_filter": "rollouts",
         "task_filter": "rollouts", "unrewarded": "windows", "stale": "windows", "constant_group": "windows",
         "duplicate_event": "events", "duplicate_step": "steps", "judge_unknown_rollout": "judge results",
         "blacklisted": "rollouts"}
BATCH_TOKENS = 64_000_000  # tokens fetched per pass-2 batch (~0.5 GB of ids + logprobs in memory)


def materialize(inputs: InputSet, kind: str, config: DatasetConfig, out_dir: Path,
                batch_tokens: int = BATCH_TOKENS) -> dict:
    """Builds a dataset from `inputs` into `out_dir` (tokens.parquet, samples.parquet); returns the manifest
    (without name/version: `store.datasets.publish` adds them)."""
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    t0 = time.monotonic()
    tokenizer = load_tokenizer(config.tokenizer)
    con = connect(inputs)
    try:
        p = plan(con, kind, config, tokenizer)
        counts: Counter = Counter()
        writer = ds.TokensWriter(out_dir / ds.TOKENS, with_logprobs=kind == "rl")
        # Batch k is encoded, digested and written on a second thread while DuckDB fetches batch k + 1
        # (both release the GIL); at most one batch waits, so memory stays ~2 batches.
        with ThreadPoolExecutor(1, thread_name_prefix="klong-dataset-writer") as pool:
            pending, batch, size = None, [], 0
            for r in p.rollouts + [None]:
                if r is not None:
                    batch.append(r)
                    size += int(p.steps["n_tokens"][r.lo:r.hi][r.used].sum())
                if batch and (r is None or size >= batch_tokens):
                    table = fetch_batch(con, p, batch, kind, tokenizer, counts)
                    if pending:
                        pending.result()
                    pending, batch, size = pool.submit(writer.write, table), [], 0
            if pending:
                pending.result()
        tokens_digest = writer.close()
    finally:
        con.close()
    samples = samples_table(p, kind)
    samples_digest = ds.write_samples(out_dir / ds.SAMPLES, samples)
    manifest = {
        "format": ds.FORMAT, "schema_version": SCHEMA_VERSION, "kind": kind, "config": config.to_dict(),
        "tokenizer": tokenizer.fingerprint,
        "counts": {**p.counts, **counts, "rollouts": writer.rows, "samples": samples.num_rows,
                   "tokens": writer.tokens, "loss_tokens": int(np.sum(samples.column("n_loss_tokens")))},
        "drops": {k: {"count": int(v), "unit": UNITS.get(k, "rollouts")} for k, v in sorted(p.drops.items())},
        "pending": p.pending,
        "input": {"flushes": list(inputs.flushes), "watermark": inputs.watermark(),
                  **({"ranges": [list(r) for r in inputs.ranges]} if inputs.ranges else {})},
        "tables": {"tokens": {"file": ds.TOKENS, "rows": writer.rows, "digest": tokens_digest},
                   "samples": {"file": ds.SAMPLES, "rows": samples.num_rows, "digest": samples_digest}},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "build_seconds": round(time.monotonic() - t0, 3),
    }
    manifest["content_hash"] = ds.content_hash(manifest, tokens_digest, samples_digest)
    return manifest


@dataclass(frozen=True)
class BuildOutcome:
    ref: str  # NAME@N
    manifest: dict
    existing: bool  # True: nothing new since this version, it was returned as is


def build_version(home: Path | str, name: str, kind: str, config: Mapping[str, Any] | DatasetConfig,
                  batch_tokens: int = BATCH_TOKENS, archive: Path | S3Location | None = None) -> BuildOutcome:
    """Builds NAME@N+1 from the whole archive (`archive`: `Settings.archive`, a directory or a bucket prefix;
    default `home/archive`), or returns the existing version built from the same input set with the same
    kind, config and tokenizer. The version's files go to `home/datasets` either way."""
    ds.check_name(name)
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    cfg = config if isinstance(config, DatasetConfig) else DatasetConfig.from_mapping(config)
    home = Path(home)
    if cfg.tokenizer != "bytes" and not Path(cfg.tokenizer).exists() and (home / "models" / cfg.tokenizer).is_dir():
        cfg = replace(cfg, tokenizer=str((home / "models" / cfg.tokenizer).resolve()))  # tokenizer=NAME: HOME/models
    archive = home / "archive" if archive is None else archive
    inputs = InputSet.scan(archive, cache=cache_dir(home, archive) if is_s3(archive) else None)
    if not inputs.flushes:
        raise ConfigError(f"the archive {archive} holds no rollout events: nothing to build "
                          "(produce events and run `klong sink run --until-idle` first)")
    fingerprint = load_tokenizer(cfg.tokenizer).fingerprint
    remote = datasets_s3.listing(home, archive) if is_s3(archive) else ds.all_manifests(home)
    for m in reversed(remote):
        if (m["name"] == name and m["kind"] == kind and m["config"] == cfg.to_dict() and m["tokenizer"] == fingerprint
                and m["input"]["flushes"] == list(inputs.flushes) and not m["input"].get("ranges")):
            if is_s3(archive):  # a version only in the bucket: fetched; one only here: uploaded (an earlier try died)
                ds.load_manifest(home, m["ref"], archive=archive)
                datasets_s3.push(archive, home, name, m["version"])
            return BuildOutcome(m["ref"], m, existing=True)
    out = ds.new_build_dir(home)
    try:
        manifest = materialize(inputs, kind, cfg, out, batch_tokens)
        taken = datasets_s3.remote_versions(archive, name) if is_s3(archive) else []
        version = ds.publish(home, name, out, manifest, taken=taken)
    except BaseException:
        ds.discard(out)
        raise
    if is_s3(archive):  # its files, then its manifest: published in the bucket for other machines' trainers
        datasets_s3.push(archive, home, name, version)
    return BuildOutcome(f"{name}@{version}", manifest, existing=False)
