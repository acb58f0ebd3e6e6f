"""Turns -> overlapping sub-trajectories (KLong eq. 4-6), as token spans over the rollout's steps.

Every window's input is `prefix tokens ++ window tokens` and must fit `max_tokens` (L_max):

- Budget `B = max_tokens - tokens(prefix)`; `B <= 0` drops the rollout ("prefix_too_long").
- A turn whose assistant step alone exceeds B is dropped ("turn_too_long"). Such turns are removed
  *before* windowing, so they never break the window arithmetic below; the turns around them stay
  adjacent in the windows (the window's spans simply skip the dropped turn's steps).
- A turn larger than B keeps its assistant step whole and only the *last* `B - act` tokens of its
  observations: earlier observation steps leave entirely, the first kept one is cut at its front
  (`obs_truncated`). Context right before the action matters most; a cut-off file head matters least.
- Window i starts at turn t_i (t_1 = first turn), takes turns t_i .. e_i - 1, the most that fit in B
  (at least one); `t_{i+1} = max(t_i + 1, e_i - O)`; stop after the window holding the last turn.
  So consecutive windows share exactly `min(O, len_prev - 1)` turns, and a rollout that fits is K = 1.
- Loss = 1 on the window's assistant steps. `loss_on_overlap=False` zeroes it on turns already in
  the previous window; `prefix_loss` says whether the prefix's assistant steps train in window 0
  only ("first"), never, or always. A step with loss trains only the ids the policy sampled (not the
  chat template's generation prompt and closing ids around them: `consumers.sampled`), so
  `Window.n_loss_tokens` counts whole assistant steps and the dataset builder recounts sampled ids.

`windows="context"` (runner rollouts that record `context_start`) cuts one window per generation context
instead: the runner gave assistant step s the context prefix ++ steps [c_s, s), c_s its recorded
`context_start` (it moves on only when the runner prunes). Window j is prefix ++ steps [c_j, e_j], e_j the
last assistant step generated in context c_j, so every window is exactly a context the policy sampled in.
Loss sits on the assistant steps generated in c_j only; the older steps the prune kept are context (they
trained in their own window), so no trained span is off-context whatever `loss_on_overlap` says. A rollout
where that does not hold (a step without `context_start`, a context starting inside the prefix, a window over
B, a turn too long) falls back to the greedy split above (`SplitResult.context_fallback`).

Windows are stored as *spans* (step_idx, tok_start, tok_end, loss) into the rollout's steps, the
prefix once per rollout, so storage grows with unique tokens, not with K. Drops come back as a
Counter by reason; units per reason are in `DROP_UNITS`.

    >>> r = split_rollout(["user", "assistant"] * 3, [True] + [False] * 5, [4, 2] * 3, SplitConfig(16, 1))
    >>> [(w.first_turn, w.last_turn, w.first_step, w.last_step, w.n_tokens) for w in r.windows]
    [(0, 1, 1, 3, 12), (1, 2, 2, 5, 16)]

Cost: a few dozen numpy calls per rollout plus a few scalar ops and one slice per window, no
per-step or per-token Python (measured ~2-4 M steps/s on one core for 600-turn rollouts).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Mapping, Optional, Sequence, get_args

import numpy as np

from consumers.turns import Roles, Turns, build_turns
from schemas.events import MAX_INT32
from schemas.errors import ConfigError
from store.windows import SPAN_LOSS, SplitResult, Window  # the window format: the dataset store reads it back

PrefixLoss = Literal["first", "never", "always"]
WindowMode = Literal["fit", "context"]
DROP_UNITS = {
    "prefix_too_long": "rollouts",  # B <= 0: nothing fits next to the prefix
    "no_turns": "rollouts",  # no assistant step after the prefix (or every turn dropped): no window
    "turn_too_long": "turns",  # the assistant step alone exceeds B
    "trailing_observations": "steps",  # observation steps after the last assistant step
}


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclass(frozen=True)
class SplitConfig:
    max_tokens: int  # L_max: prefix + window tokens per sub-trajectory
    overlap_turns: int = 0  # O: turns shared by consecutive windows
    loss_on_overlap: bool = True  # eq. 6 trains overlapped actions again
    prefix_loss: PrefixLoss = "first"
    windows: WindowMode = "fit"  # fit: eq. 4-6; context: one window per recorded generation context

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_INT32:
            raise ConfigError(f"max_tokens must be an integer >= 1 (at most {MAX_INT32}), got {self.max_tokens!r}")
        if not _is_int(self.overlap_turns) or not 0 <= self.overlap_turns <= MAX_INT32:
            raise ConfigError(f"overlap_turns must be an integer >= 0 (at most {MAX_INT32}), got {self.overlap_turns!r}")
        if not isinstance(self.loss_on_overlap, (bool, np.bool_)):
            raise ConfigError(f"loss_on_overlap must be true or false, got {self.loss_on_overlap!r}")
        if self.prefix_loss not in get_args(PrefixLoss):
            raise ConfigError(f"prefix_loss must be one of {get_args(PrefixLoss)}, got {self.prefix_loss!r}")
        if self.windows not in get_args(WindowMode):
            raise ConfigError(f"windows must be one of {get_args(WindowMode)}, got {self.windows!r}")

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> "SplitConfig":
        """Picks this stage's keys out of a whole dataset config (other keys belong to other stages)."""
        if "max_tokens" not in config:
            raise ConfigError("max_tokens is required (the context length L_max)")
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


def split_rollout(roles: Roles, pinned: Sequence[bool] | np.ndarray, n_tokens: Sequence[int] | np.ndarray,
                  config: SplitConfig, *, step_idx: Optional[Sequence[int] | np.ndarray] = None,
                  context_start: Optional[Sequence[int] | np.ndarray] = None) -> SplitResult:
    """One rollout's steps (sorted by step_idx) -> windows. See the module docstring for the rules.
    `context_start`: int [n] per step, -1 where not recorded (used by windows="context" only)."""
    turns = build_turns(roles, pinned, n_tokens, step_idx=step_idx)
    if config.windows == "context":
        res = split_contexts(turns, np.asarray(context_start if context_start is not None else
                                               np.full(len(turns.n_tokens), -1), np.int64), config)
        if res is not None:
            return res
        return replace(split_turns(turns, config), context_fallback=True)
    return split_turns(turns, config)


def split_contexts(turns: Turns, context_start: np.ndarray, config: SplitConfig) -> Optional[SplitResult]:
    """windows="context": one window per generation context (module docstring); None where it cannot apply."""
    p, is_asst, n_tok = turns.prefix_len, turns.is_assistant, turns.n_tokens
    budget = config.max_tokens - turns.prefix_tokens
    if budget <= 0 or not turns.n_turns:
        return None
    acts = turns.end_step  # the assistant steps after the prefix, in order
    ctx = context_start[acts]
    if np.any(ctx < p) or np.any(ctx > acts) or np.any(np.diff(ctx) < 0):
        return None  # not recorded, inside the prefix, or not a runner's (starts only move forward)
    prefix_spans = np.column_stack([np.arange(p), np.zeros(p, np.int64), n_tok[:p], is_asst[:p]]).astype(np.int64)
    prefix_spans.setflags(write=False)
    prefix_act = int(n_tok[:p][is_asst[:p]].sum())
    first_of = np.flatnonzero(np.concatenate([[True], ctx[1:] != ctx[:-1]]))  # first turn of each context
    last_of = np.append(first_of[1:], len(acts)) - 1
    windows = []
    for i, (a, b) in enumerate(zip(first_of.tolist(), last_of.tolist())):
        c, e = int(ctx[a]), int(acts[b])
        steps = np.arange(c, e + 1)
        n = int(n_tok[c:e + 1].sum())
        if n > budget:
            return None
        loss = is_asst[steps] & (context_start[steps] == c)  # generated in this context: the rest is context
        spans = np.column_stack([steps, np.zeros(len(steps), np.int64), n_tok[steps], loss]).astype(np.int64)
        spans.setflags(write=False)
        pl = config.prefix_loss == "always" or (config.prefix_loss == "first" and i == 0)
        t0 = int(np.searchsorted(turns.end_step, c))  # the turn holding step c
        windows.append(Window(
            window_idx=i, first_turn=t0, last_turn=b, n_turns=b - t0 + 1, first_step=c, last_step=e, spans=spans,
            n_tokens=turns.prefix_tokens + n, n_loss_tokens=int(n_tok[steps][loss.astype(bool)].sum())
            + (prefix_act if pl else 0), obs_truncated=False, prefix_loss=pl))
    drops: Counter = Counter()
    if turns.n_dropped_obs:
        drops["trailing_observations"] += turns.n_dropped_obs
    return SplitResult(p, turns.prefix_tokens, prefix_spans, budget, windows, drops)


def split_turns(turns: Turns, config: SplitConfig) -> SplitResult:
    drops: Counter = Counter()
    if turns.n_dropped_obs:
        drops["trailing_observations"] += turns.n_dropped_obs
    p, is_asst, n_tok, offsets = turns.prefix_len, turns.is_assistant, turns.n_tokens, turns.token_offsets
    prefix_spans = np.column_stack([np.arange(p), np.zeros(p, np.int64), n_tok[:p], is_asst[:p]]).astype(np.int64)
    prefix_spans.setflags(write=False)
    budget = config.max_tokens - turns.prefix_tokens

    def result(windows: list[Window]) -> SplitResult:
        return SplitResult(p, turns.prefix_tokens, prefix_spans, budget, windows, drops)

    if budget <= 0:
        drops["prefix_too_long"] += 1
        return result([])
    act, total = turns.act_tokens, turns.turn_tokens
    kept = np.flatnonzero(act <= budget)  # kept turn -> turn index
    if len(kept) < turns.n_turns:
        drops["turn_too_long"] += turns.n_turns - len(kept)
    if not len(kept):
        drops["no_turns"] += 1
        return result([])
    start, end = turns.start_step[kept], turns.end_step[kept]

    # Per-step: is the step in some kept turn, and from which token on (observation cut).
    keep_step = np.zeros(len(n_tok), dtype=bool)
    if len(kept) == turns.n_turns:
        keep_step[p: end[-1] + 1] = True
    else:  # union of [start, end] ranges: +1 at each start, -1 after each end, running sum
        marks = np.zeros(len(n_tok) + 1, dtype=np.int64)
        marks[start] = 1
        marks[end + 1] -= 1
        keep_step = np.cumsum(marks[:-1]) > 0
    tok_lo = np.zeros(len(n_tok), dtype=np.int64)
    truncated = total[kept] > budget
    if truncated.any():
        tr = np.flatnonzero(truncated)
        room = budget - act[kept[tr]]  # observation tokens that still fit next to the action
        first_tok = offsets[end[tr]] - room  # rollout-level offset of the first kept observation token
        cut = np.searchsorted(offsets, first_tok, side="right") - 1  # the step holding it
        for s, c, g in zip(start[tr].tolist(), cut.tolist(), first_tok.tolist()):
            keep_step[s:c] = False
            tok_lo[c] = g - offsets[c]  # c is the assistant step itself when room == 0: lo = 0
    steps = np.flatnonzero(keep_step)
    rows = np.column_stack([steps, tok_lo[steps], n_tok[steps], is_asst[steps]]).astype(np.int64)
    rows.setflags(write=False)  # every window's spans are views into this one array
    row_end = np.searchsorted(steps, end) + 1  # kept turn i owns rows [row_end[i-1], row_end[i])
    row_start = np.concatenate([[0], row_end[:-1]])

    seq = np.minimum(total[kept], budget)  # token length of each kept turn in a window
    cum_tok = np.concatenate([[0], np.cumsum(seq)]).tolist()
    cum_act = np.concatenate([[0], np.cumsum(act[kept])]).tolist()
    cum_trunc = np.concatenate([[0], np.cumsum(truncated)]).tolist()

    # Window boundaries: the greedy of eq. 4 with overlap, O(K log T) scalar work.
    n_kept, overlap, bounds, t = len(kept), config.overlap_turns, [], 0
    while True:
        e = bisect_right(cum_tok, cum_tok[t] + budget) - 1  # > t: a kept turn is at most B tokens
        bounds.append((t, e))
        if e >= n_kept:
            break
        t = max(t + 1, e - overlap)

    kept_l, rs, re_, end_l = kept.tolist(), row_start.tolist(), row_end.tolist(), end.tolist()
    prefix_act = int(n_tok[:p][is_asst[:p]].sum())
    windows, prev_e = [], 0
    for i, (t, e) in enumerate(bounds):
        spans = rows[rs[t]: re_[e - 1]]
        n_loss = cum_act[e] - cum_act[t]
        shared = prev_e - t if i else 0  # turns t .. t + shared - 1 were in the previous window
        if shared > 0 and not config.loss_on_overlap:
            n_loss -= cum_act[t + shared] - cum_act[t]
            spans = spans.copy()
            spans[: re_[t + shared - 1] - rs[t], SPAN_LOSS] = 0
            spans.setflags(write=False)
        pl = config.prefix_loss == "always" or (config.prefix_loss == "first" and i == 0)
        windows.append(Window(
            window_idx=i, first_turn=kept_l[t], last_turn=kept_l[e - 1], n_turns=e - t,
            first_step=int(steps[rs[t]]), last_step=end_l[e - 1], spans=spans,
            n_tokens=turns.prefix_tokens + cum_tok[e] - cum_tok[t],
            n_loss_tokens=n_loss + (prefix_act if pl else 0),
            obs_truncated=cum_trunc[e] > cum_trunc[t], prefix_loss=pl))
        prev_e = e
    return result(windows)
