"""The trainer's dataset reader: a version `NAME@N` read once into flat numpy arrays.

    reader = DatasetReader(home, "web-rl@3")   # verifies the content hash first (refuses a mismatch)
    ids, mask = reader.sample(0)               # one sample as stored; reader.batch(samples) -> MicroBatch

Reads the on-disk layout of `store.datasets` (tokens once per rollout, windows as spans) straight into
flat numpy arrays at setup, and turns every sample's spans into two short lists: *copy ranges* (runs of
tokens contiguous in storage: usually the prefix and the body, so a sample is 2-3 memcpys) and *mask runs*
(run-length loss flags, expanded with one np.repeat). Assembling a micro-batch (trainer.batch) is then a
few slice copies per sample, no per-token Python.

Loss tokens: only the ids the policy sampled carry loss (`step_loss_start`/`step_loss_end`,
`consumers.sampled`): each loss span is cut to them. `trainable` counts per sample the loss tokens the
trainer can use: not position 0, and (rl, `need_behaviour`) with a behaviour logprob.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.errors import ConfigError
from store import datasets as ds
from trainer.batch import MicroBatch, assemble


def _excl_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x), np.int64)
    np.cumsum(x[:-1], out=out[1:])
    return out


def _flat(arr) -> tuple[np.ndarray, np.ndarray]:
    """A list array -> (values [total], offsets int64 [rows + 1] from 0), slices and all."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    return arr.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def _runs(sample_of: np.ndarray, breaks: np.ndarray, values: np.ndarray, n_samples: int):
    """Groups consecutive entries into runs starting where `breaks` is true; returns (run index of each
    entry's run start, per-run sum of `values`, per-sample run offsets [n_samples + 1])."""
    starts = np.flatnonzero(breaks)
    sums = np.add.reduceat(values, starts) if len(starts) else np.zeros(0, values.dtype)
    offsets = np.zeros(n_samples + 1, np.int64)
    np.cumsum(np.bincount(sample_of[starts], minlength=n_samples), out=offsets[1:])
    return starts, sums, offsets


class DatasetReader:
    """A dataset version in memory as flat arrays, each sample as copy ranges + mask runs."""

    def __init__(self, home: Path | str, ref: str, *, verify: bool = True, vocab_size: Optional[int] = None,
                 fold_token_ids: bool = False, need_behaviour: bool = True, archive=None):
        self.need_behaviour = need_behaviour  # rl: a loss token without a behaviour logprob is left out
        # DatasetError if files != manifest hash; `archive` in a bucket: a version only there is fetched first
        version = ds.open_version(home, ref, verify=verify, archive=archive)
        self.ref, self.manifest, self.path = version.ref, version.manifest, version.path
        self.kind: str = self.manifest["kind"]
        self.content_hash: str = self.manifest["content_hash"]
        self.max_tokens: int = self.manifest["config"]["max_tokens"]
        self._load_tokens(vocab_size, fold_token_ids)
        self._load_samples()

    # ---- setup ----------------------------------------------------------------------------------

    def _load_tokens(self, vocab_size: Optional[int], fold: bool) -> None:
        cols = ["rollout_id", "prefix_len", "step_offsets", "step_assistant", "token_ids"]
        rl = self.kind == "rl"
        pf = pq.ParquetFile(self.path / ds.TOKENS)
        # Format 2: which ids of each step were sampled, at which temperature (format 1: whole steps, T = 1).
        extra = [c for c in ("step_loss_start", "step_loss_end", "step_temperature") if c in pf.schema_arrow.names]
        t = pf.read(columns=cols + extra + (["logprobs"] if rl else []))
        ids_parts, lp_parts, step_abs, step_len, step_asst, n_steps, row_base = [], [], [], [], [], [], 0
        step_extra: dict[str, list] = {c: [] for c in extra}
        for chunk in t.to_batches():  # per record batch: list offsets are int32 within a batch
            vals, tok_off = _flat(chunk.column(cols.index("token_ids")))
            base = row_base + tok_off[:-1]
            so_vals, so_off = _flat(chunk.column(cols.index("step_offsets")))
            per_row = np.diff(so_off)  # n_steps + 1 offsets per row
            abs_off = so_vals + np.repeat(base, per_row)
            keep = np.ones(len(so_vals), bool)
            keep[np.cumsum(per_row) - 1] = False  # the closing offset of each row: not a step
            step_abs.append(abs_off[keep])
            step_len.append(np.diff(abs_off)[keep[:-1]] if len(abs_off) else np.zeros(0, np.int64))
            step_asst.append(_flat(chunk.column(cols.index("step_assistant")))[0])
            for c in extra:
                step_extra[c].append(_flat(chunk.column(c))[0])
            n_steps.append(per_row - 1)
            ids_parts.append(vals)
            if rl:
                lp = pc.fill_null(chunk.column("logprobs").flatten(), float("nan"))
                lp_parts.append(lp.to_numpy(zero_copy_only=False).astype(np.float32))
            row_base += len(vals)
        self.tokens = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)  # int32 [unique tokens]
        self.logprobs = (np.concatenate(lp_parts) if lp_parts else np.zeros(0, np.float32)) if rl else None
        if vocab_size is not None and len(self.tokens):
            if fold:
                np.remainder(self.tokens, vocab_size, out=self.tokens)
            elif int(self.tokens.max()) >= vocab_size:
                raise ConfigError(f"{self.ref} holds token id {int(self.tokens.max())}, beyond the model's vocabulary "
                                  f"({vocab_size}): its tokenizer ({self.manifest['config'].get('tokenizer')}) is not "
                                  "the model's; train the model the dataset was tokenized for (model.name), or "
                                  "model.fold_token_ids=true with the tiny model")
        self.step_abs = np.concatenate(step_abs) if step_abs else np.zeros(0, np.int64)  # int64 [all steps]
        self.step_len = np.concatenate(step_len) if step_len else np.zeros(0, np.int64)
        self.step_asst = np.concatenate(step_asst) if step_asst else np.zeros(0, bool)
        cat = lambda c, dt: np.concatenate(step_extra[c]).astype(dt) if step_extra.get(c) else None  # noqa: E731
        lo, hi = cat("step_loss_start", np.int64), cat("step_loss_end", np.int64)
        # int64 [all steps]: the sampled ids of step s are its tokens [sampled_lo, sampled_hi) (None: all of them)
        self.sampled = None if lo is None or hi is None else (lo, hi)
        self.step_temp = cat("step_temperature", np.float32)  # float32 [all steps] (None: 1.0 everywhere)
        steps_per_row = np.concatenate(n_steps) if n_steps else np.zeros(0, np.int64)
        self.row_step_base = _excl_cumsum(steps_per_row)  # first step of each tokens row in the step arrays
        self.row_prefix_len = t.column("prefix_len").to_numpy().astype(np.int64)
        self._rollout_ids = t.column("rollout_id").combine_chunks()

    def _load_samples(self) -> None:
        ctx_cols = ["span_same_ctx", "prefix_same_ctx"]
        self.has_ctx = set(ctx_cols) <= set(pq.read_schema(self.path / ds.SAMPLES).names)
        s = pq.read_table(self.path / ds.SAMPLES, columns=[
            "rollout_id", "group_id", "window_idx", "n_tokens", "n_loss_tokens", "prefix_loss", "advantage",
            "span_step", "span_start", "span_end", "span_loss"] + (ctx_cols if self.has_ctx else [])).combine_chunks()
        n = s.num_rows
        self.rollout_id = s.column("rollout_id")
        self.window_idx = s.column("window_idx").to_numpy()
        self.group = (pc.dictionary_encode(s.column("group_id").combine_chunks()).indices  # int64 [n]: group codes
                      .to_numpy(zero_copy_only=False).astype(np.int64))
        found = pc.index_in(s.column("rollout_id"), value_set=self._rollout_ids)
        if found.null_count:
            raise ds.DatasetError(f"{self.ref}: a sample names a rollout missing from {ds.TOKENS}; rebuild the dataset")
        row = found.to_numpy(zero_copy_only=False).astype(np.int64)
        adv = s.column("advantage").to_numpy(zero_copy_only=False).astype(np.float32)
        self.advantage = np.nan_to_num(adv, nan=0.0)  # float32 [n]; NaN in sft datasets
        prefix_loss = s.column("prefix_loss").to_numpy(zero_copy_only=False)

        # Prefix spans: the rollout's steps [0, P), every one of them whole.
        p = self.row_prefix_len[row]
        p_sample = np.repeat(np.arange(n), p)
        p_step = np.repeat(self.row_step_base[row] - _excl_cumsum(p), p) + np.arange(int(p.sum()))
        # Body spans: (step, [start, end), loss) from samples.parquet.
        (b_step, b_off), (b_lo, _), (b_hi, _), (b_loss, _) = (
            _flat(s.column(c)) for c in ("span_step", "span_start", "span_end", "span_loss"))
        b = np.diff(b_off)
        b_sample = np.repeat(np.arange(n), b)
        b_step = self.row_step_base[row][b_sample] + b_step
        b_lo, b_hi = b_lo.astype(np.int64), b_hi.astype(np.int64)

        # All spans in sample order: sample j's prefix spans, then its body spans.
        first = _excl_cumsum(p + b)
        total = int((p + b).sum())
        start, length = np.empty(total, np.int64), np.empty(total, np.int64)
        loss, sample_of = np.empty(total, np.uint8), np.empty(total, np.int64)
        pi = np.repeat(first - _excl_cumsum(p), p) + np.arange(len(p_step))
        bi = np.repeat(first + p - _excl_cumsum(b), b) + np.arange(len(b_step))
        start[pi], length[pi] = self.step_abs[p_step], self.step_len[p_step]
        loss[pi] = self.step_asst[p_step] & prefix_loss[p_sample]
        sample_of[pi] = p_sample
        if len(b_step) and np.any(b_hi > self.step_len[b_step]):
            raise ds.DatasetError(f"{self.ref}: a window span reaches past its step's stored tokens")
        start[bi], length[bi], loss[bi], sample_of[bi] = self.step_abs[b_step] + b_lo, b_hi - b_lo, b_loss, b_sample
        ctx = np.zeros(total, np.uint8)  # the span's context is the one it was generated in
        if self.has_ctx:
            ctx[pi] = s.column("prefix_same_ctx").to_numpy(zero_copy_only=False)[p_sample]
            ctx[bi] = _flat(s.column("span_same_ctx"))[0]
        step_of = np.empty(total, np.int64)
        step_of[pi], step_of[bi] = p_step, b_step
        start, length, loss, sample_of, ctx, step_of = self._sampled_pieces(start, length, loss, sample_of, ctx,
                                                                            step_of)
        temp = self.step_temp[step_of] if self.step_temp is not None else np.ones(len(start), np.float32)
        nz = length > 0
        start, length, loss, sample_of, ctx, temp = start[nz], length[nz], loss[nz], sample_of[nz], ctx[nz], temp[nz]
        new_sample = np.ones(len(start), bool)
        new_sample[1:] = sample_of[1:] != sample_of[:-1]

        # Copy ranges: spans contiguous in storage merge (a sample is then ~2-3 memcpys).
        brk = new_sample.copy()
        brk[1:] |= start[1:] != start[:-1] + length[:-1]
        st, self.copy_len, self.copy_off = _runs(sample_of, brk, length, n)
        self.copy_src = start[st]
        # Mask runs: consecutive spans with the same loss flag merge.
        brk = new_sample.copy()
        brk[1:] |= loss[1:] != loss[:-1]
        st, self.run_len, self.run_off = _runs(sample_of, brk, length, n)
        self.run_flag = loss[st]
        # Same-context runs, likewise.
        brk = new_sample.copy()
        brk[1:] |= ctx[1:] != ctx[:-1]
        st, self.ctx_len, self.ctx_off = _runs(sample_of, brk, length, n)
        self.ctx_flag = ctx[st]
        # Temperature runs (per step: the logits of its tokens are divided by it), likewise.
        brk = new_sample.copy()
        brk[1:] |= temp[1:] != temp[:-1]
        st, self.temp_len, self.temp_off = _runs(sample_of, brk, length, n)
        self.temp_val = temp[st]

        self.lengths = np.bincount(sample_of, weights=length, minlength=n).astype(np.int64)  # int64 [n]
        n_loss = np.bincount(sample_of, weights=length * loss, minlength=n).astype(np.int64)
        want_tok = s.column("n_tokens").to_numpy()
        want_loss = s.column("n_loss_tokens").to_numpy()
        bad = np.flatnonzero((self.lengths != want_tok) | (n_loss != want_loss))
        if len(bad):
            j = int(bad[0])
            raise ds.DatasetError(f"{self.ref}: sample {self.rollout_id[j]}/{self.window_idx[j]} does not add up to "
                                  f"its n_tokens/n_loss_tokens ({self.lengths[j]}/{n_loss[j]} vs "
                                  f"{want_tok[j]}/{want_loss[j]}); rebuild the dataset")
        # Trainable loss tokens: not position 0, and (rl) with a behaviour logprob.
        at0 = (self.run_flag[self.run_off[:-1]] == 1) if n else np.zeros(0, bool)
        self.n_no_logprob = np.zeros(n, np.int64)
        self._lp_nan = None
        self.has_logprob = None  # uint8 [unique tokens] (rl): 1 where a behaviour logprob was recorded
        if self.logprobs is not None:
            self.has_logprob = (~np.isnan(self.logprobs)).view(np.uint8)
        if self.logprobs is not None and len(self.logprobs):
            nan_cs = np.zeros(len(self.logprobs) + 1, np.int64)
            np.cumsum(np.isnan(self.logprobs), out=nan_cs[1:])
            per_span = (nan_cs[start + length] - nan_cs[start]) * loss
            self.n_no_logprob = np.bincount(sample_of, weights=per_span, minlength=n).astype(np.int64)
            first_tok = self.copy_src[self.copy_off[:-1]] if n else np.zeros(0, np.int64)
            at0_nan = at0 & np.isnan(self.logprobs[first_tok]) if n else at0
            self.n_no_logprob -= at0_nan  # counted once, under position 0
            # Batches read logprobs with NaN as 0; the few samples with loss tokens lacking one use the flags.
            self._lp_nan = np.isnan(self.logprobs) if self.n_no_logprob.any() else None
            np.nan_to_num(self.logprobs, copy=False, nan=0.0)
        self.trainable = n_loss - at0 - (self.n_no_logprob if self.need_behaviour else 0)  # int64 [n]

    def _sampled_pieces(self, start, length, loss, sample_of, ctx, step_of):
        """Each span -> 3 pieces: before its step's sampled ids (no loss), the sampled ids (the span's loss),
        after them (no loss): the generation prompt and the template's closing ids never carry loss. Empty
        pieces are dropped later. Datasets without sampled ranges (format 1) keep their spans whole."""
        if self.sampled is None:
            return start, length, loss, sample_of, ctx, step_of
        base = self.step_abs[step_of]
        end = start + length
        a = np.clip(base + self.sampled[0][step_of], start, end)
        b = np.clip(base + self.sampled[1][step_of], a, end)
        off = loss == 0  # a span without loss stays one piece
        a[off], b[off] = end[off], end[off]
        three = lambda x: np.repeat(x, 3)  # noqa: E731
        new_start = np.stack([start, a, b], 1).reshape(-1)
        new_len = np.stack([a - start, b - a, end - b], 1).reshape(-1)
        new_loss = np.stack([np.zeros_like(loss), loss, np.zeros_like(loss)], 1).reshape(-1)
        return new_start, new_len, new_loss, three(sample_of), three(ctx), three(step_of)

    # ---- access ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.lengths)

    def sample_key(self, j: int) -> str:
        return f"{self.rollout_id[j].as_py()}/{int(self.window_idx[j])}"

    def sample(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int32 [n], loss_mask uint8 [n]) of sample j as stored (before the position-0 rule)."""
        c0, c1, r0, r1 = self.copy_off[j], self.copy_off[j + 1], self.run_off[j], self.run_off[j + 1]
        ids = np.concatenate([self.tokens[a:a + n] for a, n in zip(self.copy_src[c0:c1], self.copy_len[c0:c1])])
        return ids, np.repeat(self.run_flag[r0:r1], self.run_len[r0:r1]).astype(np.uint8)

    def batch(self, samples: np.ndarray) -> MicroBatch:
        """Samples -> one right-padded micro-batch."""
        return assemble(self, samples)

    def _flags(self, flat: np.ndarray, j: int) -> np.ndarray:
        c0, c1 = self.copy_off[j], self.copy_off[j + 1]
        return np.concatenate([flat[a:a + n] for a, n in zip(self.copy_src[c0:c1], self.copy_len[c0:c1])])

