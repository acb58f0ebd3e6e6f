"""Group-relative advantages (KLong eq. 9) over a whole dataset's windows, vectorized.

Group = all rewarded windows of all rollouts sharing (group_id, stage): the n rollouts of one
sample, each split into K windows, so the baseline is the mean over n*K sub-trajectories.
`A = Q - mean(Q)` per group. Options: `std_normalize` (GRPO style, divide by std + 1e-6; off by
default as in the paper) and `drop_constant_groups` (all Q equal: no learning signal; off by
default, counted as "constant_group" windows when on). Unrewarded windows (Q = NaN) join no group
and get A = NaN, keep = False; they were already counted by `consumers.rewards`.

Baseline-only windows (`baseline_only`): windows of the group that this dataset does not train on but
whose Q belongs in the group's mean (and std, and the constant-group test): the siblings of a carried-over
rollout that ended in an earlier iteration. They get A = NaN, keep = False. `members` (a rollout id per
window) lets the result count single-member groups: groups whose windows all come from one rollout.
With reward_mode=final every window of such a group has the same Q, so A = 0: no gradient.

    >>> r = group_advantages(["g", "g", "h", "h"], [1, 1, 1, 1], [1.0, 0.0, 0.5, np.nan])
    >>> r.advantage.tolist(), r.keep.tolist()
    ([0.5, -0.5, 0.0, nan], [True, True, True, False])
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

EPS = 1e-6


@dataclass(frozen=True)
class Advantages:
    advantage: np.ndarray  # float64 [n]: NaN where not kept
    keep: np.ndarray  # bool [n]: rewarded and not dropped
    group: np.ndarray  # int64 [n]: dense group number per window, -1 when unrewarded
    drops: Counter  # {"constant_group": windows} when drop_constant_groups
    counts: dict  # groups, single_member_groups, single_member_windows, baseline_windows (over trained groups)


def group_advantages(group_ids: Sequence | np.ndarray, stages: Sequence[int] | np.ndarray,
                     q: Sequence[float] | np.ndarray, *, std_normalize: bool = False,
                     drop_constant_groups: bool = False, baseline_only: Optional[np.ndarray] = None,
                     members: Optional[Sequence] = None) -> Advantages:
    """One entry per window (any order, any number of rollouts): group_id, stage, Q (NaN = unrewarded);
    optionally baseline_only (bool: in the mean, not trained) and members (the window's rollout id)."""
    q = np.asarray(q, dtype=np.float64)
    rewarded = ~np.isnan(q)
    base = np.zeros(len(q), bool) if baseline_only is None else np.asarray(baseline_only, bool)
    # Dense group number per (group_id, stage): unique ids, then unique (id number, stage) pairs.
    _, gid = np.unique(np.asarray(group_ids), return_inverse=True)
    pairs = np.stack([gid.reshape(-1), np.asarray(stages, dtype=np.int64).reshape(-1)], axis=1)[rewarded]
    _, g = np.unique(pairs, axis=0, return_inverse=True) if len(pairs) else (None, np.zeros(0, np.int64))
    g, qr = g.reshape(-1), q[rewarded]

    count = np.bincount(g)
    mean = np.bincount(g, weights=qr) / np.maximum(count, 1)
    adv = qr - mean[g]
    if std_normalize:  # population std (ddof=0) over the group, as GRPO implementations compute it
        std = np.sqrt(np.bincount(g, weights=adv**2) / np.maximum(count, 1))
        adv = adv / (std[g] + EPS)
    keep_r = np.ones(len(qr), dtype=bool)
    drops: Counter = Counter()
    if drop_constant_groups:  # exact min == max, not std == 0 (a float mean may miss by an ulp)
        lo, hi = np.full(len(count), np.inf), np.full(len(count), -np.inf)
        np.minimum.at(lo, g, qr)
        np.maximum.at(hi, g, qr)
        keep_r = (lo < hi)[g]
    keep_r &= ~base[rewarded]
    lost = ~keep_r & ~base[rewarded]
    if lost.any():
        drops["constant_group"] += int(lost.sum())

    advantage, keep, group = np.full(len(q), np.nan), np.zeros(len(q), dtype=bool), np.full(len(q), -1, np.int64)
    advantage[rewarded] = np.where(keep_r, adv, np.nan)
    keep[rewarded] = keep_r
    group[rewarded] = g
    return Advantages(advantage, keep, group, drops, _counts(g, base[rewarded], members, rewarded))


def _counts(g: np.ndarray, base: np.ndarray, members: Optional[Sequence], rewarded: np.ndarray) -> dict:
    """Over groups with at least one trained window: how many, how many from one rollout (and their trained
    windows), how many baseline-only windows joined them."""
    trained = np.zeros(int(g.max()) + 1 if len(g) else 0, bool)
    trained[g[~base]] = True
    m = np.arange(len(g)) if members is None else np.unique(np.asarray(members)[rewarded], return_inverse=True)[1]
    pairs = np.unique(np.stack([g, m.reshape(-1)], 1), axis=0) if len(g) else np.zeros((0, 2), np.int64)
    single = np.bincount(pairs[:, 0], minlength=len(trained)) == 1 if len(g) else trained
    return {"groups": int(trained.sum()), "single_member_groups": int((single & trained).sum()),
            "single_member_windows": int((single[g] & ~base).sum()) if len(g) else 0,
            "baseline_windows": int((base & trained[g]).sum()) if len(g) else 0}


def single_rollout_warning(counts: dict) -> Optional[str]:
    """A line saying why an RL version has no learning signal when every group holds one rollout (its
    manifest `counts`), else None: A = Q - mean(Q) over one rollout's windows is 0 under reward_mode=final."""
    groups, single = counts.get("groups", 0), counts.get("single_member_groups", 0)
    if not groups or single < groups:
        return None
    return (f"warning: all {groups} group(s) hold windows of a single rollout, so every group-relative advantage "
            "(eq. 9: A = Q - mean of its group) is 0 and RL loss and gradients are 0; give each group_id several "
            "rollouts of the same sample (rollouts_per_sample >= 2 in an RL plan, or shared group_id)")
