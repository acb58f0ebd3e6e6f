"""Pass 2 of a dataset build: the same-context flags and the token assembly of the kept rollouts.

    >>> table = fetch_batch(con, p, p.rollouts[:8], "rl", tokenizer, counts)   # one row per rollout

`same_context` says, per span of a window, whether the window gives that step exactly the context it was
generated in (the runner's recorded `context_start`). `fetch_batch` fetches the token ids (and logprobs)
of the steps a batch of planned rollouts stores, by a DuckDB join on (file, row number), checks their
counts against the plan, tokenizes text-only steps, and lays them out flat per rollout with per-step
offsets (`store.datasets` tokens.parquet), and which ids of each assistant step were sampled (`consumers.sampled`:
`step_loss_start`/`step_loss_end`, the only ids that carry loss) at which temperature (`step_temperature`).
`samples_table` is the per-window samples.parquet table; its `n_loss_tokens` counts sampled ids only.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from consumers.dataset_inputs import arrow, sql_list, tokenize_steps
from consumers.sampled import markup_of, sampled_ranges, temperatures
from schemas.arrow import as_list_array
from store import datasets as ds

if TYPE_CHECKING:
    from consumers.dataset_plan import Plan, PlannedRollout


def same_context(w, context_start: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """bool [n_spans]: the window gives span k's step exactly the context it was generated in. The runner
    records `context_start` c (it was given steps [0, P) ++ [c, step)); the window gives prefix ++ its spans,
    so they agree when c is the window's first step and every span up to k is its whole, consecutive step
    (no truncated observation, no dropped turn in between)."""
    sp = w.spans
    k = np.arange(len(sp))
    whole = (sp[:, 0] == w.first_step + k) & (sp[:, 1] == 0) & (sp[:, 2] == n_tokens[sp[:, 0]])
    return np.logical_and.accumulate(whole) & (context_start[sp[:, 0]] == w.first_step) & (not w.obs_truncated)




FETCH_SQL = """
SELECT c.pos, s.token_ids {lp} FROM read_parquet({files}, filename=true, file_row_number=true) s
JOIN _chosen c ON s.filename = c.file AND s.file_row_number = c.row ORDER BY c.pos"""


def fetch_batch(con, p: Plan, batch: list[PlannedRollout], kind: str, tokenizer, counts: Counter) -> pa.Table:
    st = p.steps
    sel = np.concatenate([np.arange(r.lo, r.hi)[r.used] for r in batch])  # step rows, storage order
    lens = st["n_tokens"][sel]
    dst = np.concatenate([[0], np.cumsum(lens)])  # where each selected step's tokens go
    total = int(dst[-1])
    has_ids = ~st["text_only"][sel]
    rows = sel[has_ids]
    files = sorted(set(st["file"][rows].tolist()))
    tokens = np.empty(total, np.int32)
    # Logprobs are read for sft too: where a step does not record which ids it sampled, the ids with a
    # behaviour logprob are those (consumers.sampled); only rl datasets store them.
    lp = np.full(total, np.nan, np.float32)
    if len(rows):
        con.register("_chosen", pa.table({"file": pa.array([st["files"][f] for f in st["file"][rows]], pa.string()),
                                          "row": pa.array(st["row"][rows]), "pos": pa.array(np.arange(len(rows)))}))
        t = arrow(con, FETCH_SQL.format(lp=", s.logprobs", files=sql_list([st["files"][f] for f in files])))
        con.unregister("_chosen")
        ids = as_list_array(t.column("token_ids"), "int32")
        got = ids.value_lengths().to_numpy(zero_copy_only=False)
        if len(got) != len(rows) or not np.array_equal(got, lens[has_ids]):
            raise ds.DatasetError("archive files changed while the dataset was built (token counts differ)")
        if len(rows) == len(sel):  # no text-only step: the fetched values are the layout
            tokens = ids.flatten().to_numpy()
        else:
            tokens[np.repeat(has_ids, lens)] = ids.flatten().to_numpy()
        lps = as_list_array(t.column("logprobs"), "float32")
        valid = np.zeros(len(sel), bool)
        valid[has_ids] = lps.is_valid().to_numpy(zero_copy_only=False)
        lp[np.repeat(valid, lens)] = lps.flatten().to_numpy(zero_copy_only=False)
    text = np.flatnonzero(~has_ids)
    for k, arr in zip(text.tolist(), tokenize_steps(con, st, sel[text], tokenizer) if len(text) else []):
        tokens[dst[k]:dst[k + 1]] = arr
    lo, hi = sampled_ranges(st, sel, tokens, lp, dst, markup_of(tokenizer))
    if "loss_lo" not in st:  # per step row of the plan: read by samples_table once every batch is fetched
        st["loss_lo"], st["loss_hi"] = np.zeros(len(st["n_tokens"]), np.int64), np.zeros(len(st["n_tokens"]), np.int64)
    st["loss_lo"][sel], st["loss_hi"][sel] = lo, hi
    asst = st["is_asst"][sel]
    counts["assistant_markup_tokens"] += int((lens - (hi - lo))[asst].sum())  # header/closing ids: no loss
    if kind == "rl":  # an assistant step without logprobs (text-only import): NaN in the reader, counted
        first = dst[:-1][asst & (lens > 0)]
        counts["assistant_steps_without_logprobs"] += int(np.isnan(lp[first]).sum())
    else:
        lp = None

    # One row per rollout: flat tokens, per-step offsets (unused steps are empty), roles.
    n_used = np.cumsum([int(r.used.sum()) for r in batch])
    tok_off = dst[np.concatenate([[0], n_used])].astype(np.int32)
    step_off, asst_l, loss_lo, loss_hi, temp = [], [], [], [], []
    for r in batch:
        n_tok = np.where(r.used, st["n_tokens"][r.lo:r.hi], 0)
        step_off.append(np.concatenate([[0], np.cumsum(n_tok)]))
        asst_l.append(st["is_asst"][r.lo:r.hi])
        loss_lo.append(np.where(r.used, st["loss_lo"][r.lo:r.hi], 0))
        loss_hi.append(np.where(r.used, st["loss_hi"][r.lo:r.hi], 0))
        temp.append(temperatures(st, np.arange(r.lo, r.hi)))
    info = [r.info for r in batch]
    cols = {
        "rollout_id": [i["rollout_id"] for i in info], "group_id": [i["group_id"] for i in info],
        "task_id": [i["task_id"] for i in info], "status": [i["status"] for i in info],
        "stage": [i["stage"] for i in info], "iteration": [i["iteration"] for i in info],
        "prefix_len": [r.prefix_len for r in batch],
        "prefix_tokens": [int(st["n_tokens"][r.lo:r.lo + r.prefix_len].sum()) for r in batch],
        "step_offsets": _list(step_off, pa.int64()), "step_assistant": _list(asst_l, pa.bool_()),
        "step_loss_start": _list(loss_lo, pa.int32()), "step_loss_end": _list(loss_hi, pa.int32()),
        "step_temperature": _list(temp, pa.float32()),
        "token_ids": pa.ListArray.from_arrays(pa.array(tok_off), pa.array(tokens)),
    }
    if lp is not None:
        cols["logprobs"] = pa.ListArray.from_arrays(pa.array(tok_off), pa.array(lp, mask=np.isnan(lp)))
    return pa.table(cols)


def _list(parts: list[np.ndarray], typ: pa.DataType) -> pa.Array:
    off = np.concatenate([[0], np.cumsum([len(x) for x in parts])]).astype(np.int32)
    vals = np.concatenate(parts) if parts else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(off), pa.array(vals, typ))


def loss_tokens(p: Plan) -> list[int]:
    """Per window (samples order): its loss tokens, the sampled ids of its loss spans (and of the prefix's
    assistant steps where prefix_loss), once fetch_batch has recorded every step's sampled range."""
    st, out = p.steps, []
    lo_all, hi_all = st.get("loss_lo"), st.get("loss_hi")
    for r in p.rollouts:
        lo, hi = lo_all[r.lo:r.hi], hi_all[r.lo:r.hi]
        asst = st["is_asst"][r.lo:r.lo + r.prefix_len]
        prefix = int((hi[:r.prefix_len] - lo[:r.prefix_len])[asst].sum())
        for w in r.windows:
            sp = w.spans
            step = sp[:, 0]
            a, b = np.maximum(sp[:, 1], lo[step]), np.minimum(sp[:, 2], hi[step])
            out.append(int((np.maximum(b - a, 0) * sp[:, 3]).sum()) + (prefix if w.prefix_loss else 0))
    return out


def samples_table(p: Plan, kind: str) -> pa.Table:
    rows = [(r.info, w) for r in p.rollouts for w in r.windows]
    same = [r.same_ctx[w.window_idx] for r in p.rollouts for w in r.windows]
    prefix_same = [r.prefix_same_ctx for r in p.rollouts for _ in r.windows]
    spans = [w.spans for _, w in rows]
    g = lambda f: [getattr(w, f) for _, w in rows]  # noqa: E731
    rl = kind == "rl"
    return pa.table({
        "rollout_id": [i["rollout_id"] for i, _ in rows], "group_id": [i["group_id"] for i, _ in rows],
        "task_id": [i["task_id"] for i, _ in rows], "stage": [i["stage"] for i, _ in rows],
        "iteration": [i["iteration"] for i, _ in rows], "window_idx": g("window_idx"), "first_turn": g("first_turn"),
        "last_turn": g("last_turn"), "n_turns": g("n_turns"), "first_step": g("first_step"), "last_step": g("last_step"),
        "n_tokens": g("n_tokens"), "n_loss_tokens": loss_tokens(p) if rows else [], "obs_truncated": g("obs_truncated"),
        "prefix_loss": g("prefix_loss"),
        "q": pa.array(p.samples["q"] if rl else np.zeros(len(rows)), mask=None if rl else np.ones(len(rows), bool)),
        "advantage": pa.array(p.samples["advantage"] if rl else np.zeros(len(rows)), mask=None if rl else np.ones(len(rows), bool)),
        "policy_version": p.samples["policy_version"], "staleness": p.samples["staleness"],
        **{name: _list([s[:, c] for s in spans], typ) for c, (name, typ) in enumerate(
            [("span_step", pa.int32()), ("span_start", pa.int32()), ("span_end", pa.int32()), ("span_loss", pa.bool_())])},
        "span_same_ctx": _list(same, pa.bool_()), "prefix_same_ctx": pa.array(prefix_same, pa.bool_()),
    })
