"""One step's tokens for `klong ui`'s token view: each token's id, text and behaviour log-prob, and, for a
chosen dataset window, which of them carry loss.

    tv = step_tokens(catalog, rollout_id, 5)                          # the archive's ids and logprobs
    tv = step_tokens(catalog, rollout_id, 5, home=home, ref="web-rl@3", window=0, tokenizer="bytes")
    tv["tokens"]   # [{"id": 1234, "text": "▁the", "logprob": -0.31 | None, "loss": True | False | None}]

The loss mask is the dataset's own: the window is read back through store.datasets' reader
(`DatasetVersion`, the trainer's code path) limited to that one window, so whatever rule decides which
tokens carry loss, the view shows what the trainer trains on. The step's slice of the window input follows
the version's layout (input = the prefix steps' tokens, then each span of the window in order); a step
the window holds only partly (an observation cut to fit) shows the part it holds.

Token texts come from `tokenizer` (the dataset's `tokenizer` when a window is chosen, else `klong ui
--tokenizer`); without one the view shows ids.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from store.catalog import Catalog, sql_str
from store.datasets import SAMPLES, TOKENS, DatasetError, DatasetVersion
from ui.viewer import NotFound

MAX_TOKENS = 20_000  # tokens a view shows (a 14 kB tool output is ~4,000)


class OneWindow(DatasetVersion):
    """A dataset version whose reader yields one rollout's one window (the trainer's reader, narrowed)."""

    def __init__(self, home, ref: str, rollout_id: str, window: int):
        super().__init__(home, ref)
        self.rollout_id, self.window = rollout_id, window

    def samples(self) -> pa.Table:
        t = pq.read_table(self.path / SAMPLES, filters=[("rollout_id", "=", self.rollout_id)])
        return t.filter(pc.and_(pc.equal(t["rollout_id"], self.rollout_id), pc.equal(t["window_idx"], self.window)))


@lru_cache(maxsize=4)
def _tokenizer(spec: str):
    from core.tokenize import load_tokenizer

    return load_tokenizer(spec)


def _texts(ids: list[int], spec: Optional[str]) -> list[Optional[str]]:
    """Each id's text; None where there is no tokenizer or the id is not in its vocabulary (a tokenizer that
    is not the rollout's: the id is shown instead)."""
    if not spec:
        return [None] * len(ids)
    tok = _tokenizer(spec)

    def text(i: int) -> Optional[str]:
        try:
            return tok.decode([i])
        except (ValueError, OverflowError, IndexError, TypeError, KeyError):
            return None

    return [text(i) for i in ids]


def resolve_tokenizer(home: Path, spec: Optional[str]) -> Optional[str]:
    """A tokenizer spec as the dataset builder resolves it ("bytes", a path, or a model name in HOME/models)."""
    if not spec:
        return None
    if spec != "bytes" and not Path(spec).exists() and (Path(home) / "models" / spec).is_dir():
        return str((Path(home) / "models" / spec).resolve())
    return spec


def step_tokens(catalog: Catalog, rollout_id: str, step_idx: int, home: Optional[Path] = None,
                ref: Optional[str] = None, window: Optional[int] = None, tokenizer: Optional[str] = None) -> dict:
    """The token view of one step (see the module docstring); NotFound for an unknown step or window."""
    rows = catalog.arrow(f"SELECT role, token_ids, logprobs FROM step_tokens WHERE rollout_id = {sql_str(rollout_id)} "
                         f"AND step_idx = {int(step_idx)} LIMIT 1").to_pylist()
    if not rows:
        raise NotFound(f"rollout {rollout_id!r} has no step {step_idx}")
    role, ids, lps = rows[0]["role"], rows[0]["token_ids"] or [], rows[0]["logprobs"]
    view = {"rollout_id": rollout_id, "step_idx": step_idx, "role": role, "ref": ref, "window": window,
            "n_archived": len(ids), "mask": None, "note": None}
    loss: list[Optional[bool]] = [None] * len(ids)
    if ref is not None and window is not None:
        try:
            ds = OneWindow(home, ref, rollout_id, window)
        except DatasetError as e:
            raise NotFound(str(e)) from e
        tokenizer = resolve_tokenizer(home, ds.manifest.get("config", {}).get("tokenizer")) or tokenizer
        ids, loss, window_lps, note = _window_slice(ds, step_idx)
        if window_lps is not None and any(x is not None for x in window_lps):
            lps = window_lps
        elif lps is not None:  # a cut observation keeps its last tokens: align the archive's logprobs at the end
            lps = lps[len(lps) - len(ids):] if len(ids) <= len(lps) else None
        view["note"] = note
        view["mask"] = {"loss": sum(bool(x) for x in loss), "of": len(ids)}
    lps = list(lps) if lps is not None else [None] * len(ids)
    shown = min(len(ids), MAX_TOKENS)
    texts = _texts(ids[:shown], tokenizer)
    view["tokenizer"] = tokenizer
    view["tokens"] = [{"id": ids[k], "text": texts[k], "logprob": _finite(lps[k] if k < len(lps) else None),
                       "loss": loss[k]} for k in range(shown)]
    view["cut"] = len(ids) - shown
    return view


def _finite(x) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def _window_slice(ds: OneWindow, step_idx: int):
    """(ids, loss mask, logprobs or None, note) of step `step_idx` within the window, from the trainer's reader."""
    samples = ds.samples()
    if samples.num_rows == 0:
        raise NotFound(f"{ds.ref} has no window {ds.window} of rollout {ds.rollout_id!r}")
    sample = next(iter(ds), None)
    if sample is None:
        raise NotFound(f"{ds.ref}: rollout {ds.rollout_id!r} has no tokens in the version")
    w = samples.to_pylist()[0]
    tok = pq.read_table(ds.path / TOKENS,
                        columns=["rollout_id", "prefix_len", "step_offsets"],
                        filters=[("rollout_id", "=", ds.rollout_id)]).to_pylist()[0]
    offsets, p = tok["step_offsets"], tok["prefix_len"]
    segments = [(s, offsets[s + 1] - offsets[s]) for s in range(p)]
    segments += [(s, b - a) for s, a, b in zip(w["span_step"], w["span_start"], w["span_end"])]
    if sum(n for _, n in segments) != len(sample.input_ids):
        raise DatasetError(f"{ds.ref}: window {ds.window} of {ds.rollout_id!r} does not add up to its layout")
    at, mine = 0, None
    for s, n in segments:
        if s == step_idx:
            mine = (at, n)
        at += n
    if mine is None:
        raise NotFound(f"{ds.ref}: window {ds.window} does not hold step {step_idx} "
                       f"(it holds the prefix and steps {w['first_step']}–{w['last_step']})")
    a, n = mine
    ids = sample.input_ids[a:a + n].tolist()
    loss = [bool(x) for x in sample.loss_mask[a:a + n]]
    lps = None if sample.logprobs is None else [_finite(x) for x in sample.logprobs[a:a + n].tolist()]
    full = offsets[step_idx + 1] - offsets[step_idx]
    note = f"the window holds the last {n:,} of this step's {full:,} tokens" if n < full else None
    return ids, loss, lps, note
