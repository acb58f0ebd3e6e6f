"""Pass 1 of a dataset build: the plan. Every decision (which rollouts, windows, rewards, advantages, steps).

    >>> p = plan(con, "rl", DatasetConfig(), tokenizer)   # -> Plan(steps, rollouts, samples, drops, pending, counts)

Reads only small columns (`consumers.dataset_inputs`), never token values: memory ~ O(steps). Per rollout
it applies the exclusions (task split, filters, status, step gaps, blacklist; each counted in `drops`),
splits it into windows (`consumers.split`), rewards them (`consumers.rewards`), then over the whole
dataset keeps the fresh rewarded windows and computes group advantages (`consumers.advantages`), with
siblings from earlier iterations in the baseline only. The kept rollouts come out in storage order
(by archive file) with the steps each one stores marked in `used`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import duckdb
import numpy as np

from consumers.advantages import group_advantages
from consumers.dataset_config import DatasetConfig
from consumers.dataset_inputs import (INPUT_TYPES, ROLLOUTS_SQL, arrow, column_or, judge_results, scalar, step_table,
                                      task_splits)
from consumers.dataset_tokens import same_context
from consumers.rewards import assign_rewards
from consumers.split import split_rollout
from schemas.errors import ConfigError
from store.blacklist import blacklisted_rollouts


@dataclass
class PlannedRollout:
    info: dict  # rollout_id, task_id, group_id, stage, iteration, status
    lo: int  # its steps are rows [lo, hi) of the step table, in step_idx order
    hi: int
    prefix_len: int = 0
    windows: list = field(default_factory=list)  # kept consumers.split.Window objects
    same_ctx: list = field(default_factory=list)  # per window of the split (window_idx): bool [n_spans]
    prefix_same_ctx: bool = False  # every prefix step was recorded with its generation context
    context_fallback: bool = False  # windows=context asked, split greedily instead (consumers.split)
    used: Optional[np.ndarray] = None  # bool [n_steps]: steps stored (prefix + the kept windows' spans)


@dataclass
class Plan:
    steps: dict  # numpy columns of the chosen step rows (sorted by rollout_id, step_idx) + "files"
    rollouts: list  # PlannedRollout with at least one kept window, in storage order
    samples: dict  # per kept window (same order): q, advantage, policy_version, staleness
    drops: Counter
    pending: list
    counts: dict



def plan(con: duckdb.DuckDBPyConnection, kind: str, config: DatasetConfig, tokenizer) -> Plan:
    """Pass 1: every decision (which rollouts, windows, rewards, advantages, which steps to store)."""
    drops: Counter = Counter()
    for etype in INPUT_TYPES:
        drops["duplicate_event"] += scalar(con, f"SELECT count(*) - count(DISTINCT event_id) FROM raw_{etype}")
    splits = task_splits(con)
    for t in config.tasks or ():
        if not splits.get(t, True):
            raise ConfigError(f"tasks: {t!r} is an eval task; eval tasks never enter a training dataset")
        if t not in splits:
            raise ConfigError(f"tasks: {t!r} is not a registered task (see `klong sql \"SELECT * FROM tasks\"`)")
    steps = step_table(con, tokenizer, drops)
    rinfo = arrow(con, ROLLOUTS_SQL.format(tokenizer=column_or(con, "rollout_started", "tokenizer", "''"))).to_pylist()
    judges = judge_results(con)

    # Step rows of each rollout: the table is sorted by rollout_id, so boundaries are where it changes.
    rid, n = steps["rollout_id"], len(steps["rollout_id"])
    starts = np.flatnonzero(np.concatenate([[True], rid[1:] != rid[:-1]])) if n else np.zeros(0, np.int64)
    bounds = {rid[s]: (s, e) for s, e in zip(starts.tolist(), np.append(starts[1:], n).tolist())}
    started = {r["rollout_id"] for r in rinfo}
    drops["no_rollout_started"] += len(set(bounds) - started)
    drops["judge_unknown_rollout"] += sum(len(j["step_idx"]) for r, j in judges.items() if r not in started)

    # Rollouts that touched a URL their task forbids never enter a dataset (store.blacklist).
    blacklisted = blacklisted_rollouts(
        con, "SELECT rollout_id, step_idx, role, content, tool_call.arguments AS tool_arguments FROM raw_step",
        "SELECT rollout_id, arg_min(task_id, produced_at) AS task_id FROM rollout_started GROUP BY rollout_id",
        "task_registered")
    pending, rollouts, wins, sib_rollouts, sib_wins = [], [], [], [], []
    any_iteration = replace(config, iteration=None)
    for info in rinfo:
        counted_elsewhere = _excluded(info, splits, config)  # eval/unknown task or a filter: _split_one counts it
        if info["rollout_id"] in blacklisted and not counted_elsewhere:
            drops["blacklisted"] += 1
        elif info["pending"] and not counted_elsewhere:
            pending.append(info["rollout_id"])
        else:
            _split_one(info, bounds, steps, judges, splits, kind, config, drops, rollouts, wins)
            if (kind == "rl" and counted_elsewhere == "iteration_filter" and not info["pending"]
                    and info["iteration"] < max(config.iteration)
                    and info["rollout_id"] not in blacklisted):  # a sibling from an earlier iteration: baseline only
                _split_one(info, bounds, steps, judges, splits, kind, any_iteration, Counter(), sib_rollouts, sib_wins)
    keep, adv, stale, group_counts = _choose(wins, rollouts, kind, config, drops, sib_wins, sib_rollouts)

    for i in np.flatnonzero(keep):
        rollouts[wins[i].rollout].windows.append(i)
    stored = [r for r in rollouts if r.windows]
    mixed = sorted(steps.get("mixed", set()) & {r.info["rollout_id"] for r in stored})
    if mixed:  # only the rollouts this build selects are checked
        raise ConfigError(f"rollout {mixed[0]} has recorded token ids and text-only steps: a chat template cannot "
                          "render only some of its messages (re-import it with --tokenizer MODEL_DIR, or leave it "
                          "out with tasks=/iteration=)")
    token_source = _one_tokenizer(stored, steps, tokenizer)
    for r in stored:  # steps to store: the prefix and every step a kept window reads
        r.used = np.zeros(r.hi - r.lo, bool)
        r.used[:r.prefix_len] = True
        for i in r.windows:
            r.used[wins[i].window.spans[:, 0]] = True
    # Storage order: by the archive file holding the rollout's first step (a pass-2 batch reads few files).
    stored.sort(key=lambda r: (int(steps["file"][r.lo]) if r.hi > r.lo else 0, r.info["rollout_id"]))
    order = np.array([i for r in stored for i in r.windows], np.int64)
    for r in stored:
        r.windows = [wins[i].window for i in r.windows]
    samples = {"q": np.array([w.q for w in wins], np.float64)[order] if len(order) else np.zeros(0),
               "advantage": adv[order], "policy_version": np.array([w.policy_version for w in wins], np.int64)[order]
               if len(order) else np.zeros(0, np.int64), "staleness": stale[order]}
    newest = max((w.newest for w in wins), default=None)
    counts = {"steps_read": int(n), "rollouts_seen": len(rinfo), "windows_split": len(wins),
              "newest_policy_version": newest, **group_counts, "token_ids_from": token_source,
              **({"context_fallback_rollouts": sum(r.context_fallback for r in rollouts)}
                 if config.windows == "context" else {})}
    return Plan(steps, stored, samples, +drops, sorted(pending), counts)


def _one_tokenizer(stored: list, steps: dict, tokenizer) -> str:
    """The one tokenizer fingerprint the dataset's ids come from, or a ConfigError naming two rollouts whose
    ids come from different ones. A rollout's recorded ids count with its rollout_started.tokenizer ("":
    unknown, an older recorder, not checkable); its text-only steps with the build's `tokenizer`."""
    seen: dict[str, str] = {}
    for r in stored:
        text = steps["text_only"][r.lo:r.hi][r.used]
        if (~text).any() and r.info.get("tokenizer"):
            seen.setdefault(r.info["tokenizer"], r.info["rollout_id"])
        if text.any():
            seen.setdefault(tokenizer.fingerprint, r.info["rollout_id"])
    if len(seen) > 1:
        (a, ra), (b, rb) = list(seen.items())[:2]
        raise ConfigError(f"the dataset would mix token ids of different tokenizers: rollout {ra} has ids from {a}, "
                          f"rollout {rb} from {b} (text-only steps count as tokenizer={tokenizer.fingerprint}); build "
                          "from one tokenizer's rollouts (tasks=, iteration=) or set tokenizer= to the model directory "
                          "they were recorded with")
    return next(iter(seen), "")


@dataclass(frozen=True)
class _Win:
    rollout: int  # index into the rollouts list
    window: Any  # consumers.split.Window
    q: float  # NaN: unrewarded (or sft)
    policy_version: int  # the oldest policy that acted in the window
    newest: int  # the newest policy that acted in its rollout


def _split_one(info: dict, bounds: dict, steps: dict, judges: dict, splits: dict, kind: str,
               config: DatasetConfig, drops: Counter, rollouts: list, wins: list) -> None:
    """One finished rollout -> its windows (appended to `wins`), or a drop reason counted."""
    reason = _excluded(info, splits, config)
    if not reason and info["status"] not in config.statuses:
        reason = f"status_{info['status']}"
    lo, hi = bounds.get(info["rollout_id"], (0, 0))
    idx = steps["step_idx"][lo:hi]
    if not reason and ((hi > lo and idx[-1] != hi - lo - 1) or (info["n_steps"] or 0) > hi - lo):
        reason = "step_gap"  # steps are unique and sorted: dense iff the last one is count - 1
    if reason:
        drops[reason] += 1
        return
    is_asst = steps["is_asst"][lo:hi]
    ctx = steps["context_start"][lo:hi]
    res = split_rollout(is_asst, steps["pinned"][lo:hi], steps["n_tokens"][lo:hi], config.split_config(),
                        context_start=ctx)
    drops.update(res.drops)
    if not res.windows:
        return
    q = np.full(len(res.windows), np.nan)
    if kind == "rl":
        j = judges.get(info["rollout_id"], {"step_idx": [], "score": [], "valid": [], "order": []})
        q, rdrops = assign_rewards([w.last_step for w in res.windows], j, config.reward_mode)
        drops.update(rdrops)
    pv = steps["policy_version"][lo:hi]
    newest = int(pv[is_asst].max())
    for w, qw in zip(res.windows, q.tolist()):
        body = w.spans[:, 0]
        wins.append(_Win(len(rollouts), w, qw, int(pv[body[is_asst[body]]].min()), newest))
    rollouts.append(PlannedRollout(info, lo, hi, res.prefix_len,
                             same_ctx=[same_context(w, ctx, steps["n_tokens"][lo:hi]) for w in res.windows],
                             prefix_same_ctx=bool(np.all(ctx[:res.prefix_len] >= 0)),
                             context_fallback=res.context_fallback))



def _choose(wins: list, rollouts: list, kind: str, config: DatasetConfig, drops: Counter, sib_wins: list = (),
            sib_rollouts: list = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Which windows stay (rewarded, fresh enough, in a group with signal) -> (keep, advantage, staleness, group
    counts). `sib_wins`: rewarded windows of rollouts the iteration filter leaves out (siblings of a carried-over
    rollout that ended in another iteration): in their group's baseline, never trained."""
    keep = np.array([kind == "sft" or not np.isnan(w.q) for w in wins], bool)
    newest = config.trainer_policy_version
    if newest is None:
        newest = max((w.newest for w in wins), default=0)
    stale = newest - np.array([w.policy_version for w in wins], np.int64)
    if config.max_staleness is not None:
        too_old = keep & (stale > config.max_staleness)
        drops["stale"] += int(too_old.sum())
        keep &= ~too_old
    adv, counts = np.full(len(wins), np.nan), {}
    if kind == "rl" and keep.any():
        k = np.flatnonzero(keep)
        info = [rollouts[wins[i].rollout].info for i in k] + [sib_rollouts[w.rollout].info for w in sib_wins]
        a = group_advantages([x["group_id"] for x in info], [x["stage"] for x in info],
                             np.array([wins[i].q for i in k] + [w.q for w in sib_wins]),
                             std_normalize=config.std_normalize, drop_constant_groups=config.drop_constant_groups,
                             baseline_only=np.arange(len(info)) >= len(k), members=[x["rollout_id"] for x in info])
        adv[k] = a.advantage[:len(k)]
        keep[k] = a.keep[:len(k)]
        drops.update(a.drops)
        counts = a.counts
    return keep, adv, stale, counts


def _excluded(info: dict, splits: dict[str, bool], config: DatasetConfig) -> Optional[str]:
    train = splits.get(info["task_id"])
    if train is None:
        return "unknown_task"
    if not train:
        return "eval_task"
    if config.tasks is not None and info["task_id"] not in config.tasks:
        return "task_filter"
    if config.stage is not None and info["stage"] not in config.stage:
        return "stage_filter"
    if config.iteration is not None and info["iteration"] not in config.iteration:
        return "iteration_filter"
    return None
