"""A window (sub-trajectory) of a rollout as the dataset store keeps it, and reading its tokens back.

    result = consumers.split.split_rollout(roles, pinned, n_tokens, config)   # -> SplitResult of Windows
    ids, loss_mask = materialize(result, result.windows[0], tokens)          # int32 [n], uint8 [n]

A window is spans (step_idx, tok_start, tok_end, loss) into the rollout's steps, the prefix stored once per
rollout (`SplitResult.prefix_spans`); input = prefix ++ spans. consumers.split decides the windows;
store.datasets writes them and reads them back with `materialize_flat`, so the format lives here, below both.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from schemas.errors import ValidationError

# Span columns: tokens [tok_start, tok_end) of step `step_idx`, with loss 0/1.
SPAN_STEP, SPAN_START, SPAN_END, SPAN_LOSS = range(4)


@dataclass(frozen=True, slots=True)
class Window:
    window_idx: int  # 0-based within the rollout
    first_turn: int  # turn indices (numbering of `Turns`), inclusive; dropped turns inside are skipped
    last_turn: int
    n_turns: int  # turns in the window (dropped turns not counted)
    first_step: int  # step range of the body, inclusive, prefix excluded (first step with kept tokens)
    last_step: int
    spans: np.ndarray  # int64 [n_spans, 4], read-only: (step_idx, tok_start, tok_end, loss) per body step
    n_tokens: int  # prefix included
    n_loss_tokens: int  # prefix assistant tokens included when prefix_loss
    obs_truncated: bool  # a turn of this window lost the front of its observations
    prefix_loss: bool  # whether the prefix's assistant tokens carry loss in this window


@dataclass(frozen=True)
class SplitResult:
    prefix_len: int  # P
    prefix_tokens: int
    prefix_spans: np.ndarray  # int64 [P, 4]: (step_idx, 0, n_tokens, is_assistant), stored once per rollout
    budget: int  # B = max_tokens - prefix_tokens
    windows: list[Window]
    drops: Counter  # reason -> count (units in consumers.split.DROP_UNITS)
    context_fallback: bool = False  # windows="context" asked, but the rollout was split greedily (consumers.split)


def flatten_tokens(tokens: Sequence[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-step token arrays (indexed by step_idx) -> (values int64 [N], offsets int64 [n_steps + 1])."""
    lens = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    parts = [np.asarray(t, dtype=np.int64) for t in tokens]
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), offsets


def materialize(result: SplitResult, window: Window, tokens: Sequence[Sequence[int] | np.ndarray],
                sampled: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Window -> (input_ids int32 [n_tokens], loss_mask uint8 [n_tokens]) = prefix ++ window body.

    `tokens`: the rollout's token ids per step, indexed by step_idx. `sampled`: (start, end) int [n_steps], the
    ids of step s the policy sampled are [start[s], end[s]); only those carry loss (None: whole steps).
    """
    return materialize_flat(result, window, *flatten_tokens(tokens), sampled)


def materialize_flat(result: SplitResult, window: Window, values: np.ndarray, offsets: np.ndarray,
                     sampled: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray]:
    """`materialize` on the Arrow list layout a Parquet read gives: step s owns values[offsets[s]:offsets[s+1]]."""
    values, offsets = np.asarray(values), np.asarray(offsets, dtype=np.int64)
    prefix = result.prefix_spans.copy()
    prefix[:, SPAN_LOSS] &= int(window.prefix_loss)
    spans = np.concatenate([prefix, window.spans])
    step, lo, hi = spans[:, SPAN_STEP], spans[:, SPAN_START], spans[:, SPAN_END]
    if len(step) and (step.max() + 1 >= len(offsets) or np.any(offsets[step + 1] - offsets[step] != hi)):
        raise ValidationError("token arrays do not match the n_tokens the rollout was split with")
    lens = hi - lo
    # Gather without a per-step loop: position k of span s reads values[offsets[step_s] + lo_s + k].
    base = offsets[step] + lo - (np.cumsum(lens) - lens)
    idx = np.repeat(base, lens) + np.arange(int(lens.sum()))
    mask = np.repeat(spans[:, SPAN_LOSS], lens).astype(np.uint8)
    if sampled is not None:  # within its step, token k of a span sits at lo + k: in [start, end) or not
        start, end = (np.asarray(x, np.int64) for x in sampled)
        at = idx - np.repeat(offsets[step], lens)
        mask &= ((at >= np.repeat(start[step], lens)) & (at < np.repeat(end[step], lens))).astype(np.uint8)
    return values[idx].astype(np.int32), mask
