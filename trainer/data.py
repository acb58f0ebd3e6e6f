"""Versioned batches: a dataset version `NAME@N` -> padded micro-batches for the trainer.

    reader = DatasetReader(home, "web-rl@3")                 # verifies the content hash first (refuses a mismatch)
    plan = BatchPlan(reader, micro_batch_tokens=8192, seed=0, rank=r, world_size=w, accumulation=a)
    for step in plan.steps(Position()):                      # step.micro_batches: this rank's, len == a
        mb.input_ids, mb.loss_mask, mb.advantage, mb.logprobs  # [b, T] each; step.totals: the whole step's

Reads the on-disk layout of `store.datasets` (tokens once per rollout, windows as spans) straight into
flat numpy arrays at setup, and turns every sample's spans into two short lists: *copy ranges* (runs of
tokens contiguous in storage: usually the prefix and the body, so a sample is 2-3 memcpys) and *mask runs*
(run-length loss flags, expanded with one np.repeat). Assembling a micro-batch is then a few slice copies
per sample, no per-token Python (bench/loader.py measures it against a plain copy and HF datasets).

Order and sharding. An epoch's order is a permutation drawn from (seed, epoch). Samples are packed in
that order into *global* micro-batches of at most `micro_batch_tokens` padded tokens (rows x longest
row). One optimizer step takes G = world_size x accumulation consecutive global micro-batches; rank r
runs those at positions r, r + W, ... So the packing, and what a step holds, do not depend on W: one
process with accumulation 2 sees exactly the steps two processes with accumulation 1 see, and every
sample is seen once per epoch across ranks. The epoch's last step is filled with empty micro-batches
(loss mask all zero) so every rank runs the same number of forward/backward passes (collectives).
Each step also carries the *global* totals (loss tokens, samples) that the loss is normalized by, so
no rank needs to ask the others. The position (epoch, next global micro-batch) is all a checkpoint
needs to continue with the same order.

Token alignment: loss is on input positions; the logit at t - 1 predicts token t, so a loss token at
position 0 cannot be trained and is not counted. Only the ids the policy sampled carry loss: a dataset stores per step which ids those are
(`step_loss_start`/`step_loss_end`, `consumers.sampled`) and each loss span is cut to them, so the generation
prompt and the template's closing ids stay in the input without loss. RL: the temperature each step was
sampled at comes with every token (`MicroBatch.temperature`); loss tokens without a behaviour logprob (a text-only
import) are counted (`n_no_logprob`);
they are trained when the trainer recomputes the old logprobs (`need_behaviour=False`, the default
`loss.old_logprobs: recompute`) and left out of the loss when the ratio divides by the behaviour logprob.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.errors import ConfigError
from store import datasets as ds


@dataclass(frozen=True)
class MicroBatch:
    input_ids: np.ndarray  # int32 [b, T], right-padded with 0 (causal attention: pads never reach real tokens)
    loss_mask: np.ndarray  # uint8 [b, T]: 1 where the token is trained (position 0 and no-logprob tokens: 0)
    advantage: Optional[np.ndarray]  # float32 [b, T] (rl): the sample's advantage on loss tokens, 0 elsewhere
    logprobs: Optional[np.ndarray]  # float32 [b, T] (rl): behaviour logprob of each token, 0 where none (read it
    #                                 where loss_mask is 1: elsewhere it may hold an untrained action's logprob)
    has_logprob: Optional[np.ndarray]  # uint8 [b, T] (rl): 1 where a behaviour logprob was recorded
    same_ctx: Optional[np.ndarray]  # uint8 [b, T] (rl): 1 where the window gives the token the context it was
    #                                 generated in (datasets before span_same_ctx: where it has a behaviour logprob)
    samples: np.ndarray  # int64 [b]: sample numbers (rows of samples.parquet)
    lengths: np.ndarray  # int64 [b]: unpadded lengths
    temperature: Optional[np.ndarray] = None  # float32 [b, T] (rl): the temperature each token was sampled at
    #                                           (1.0 where unknown and on pads): the trainer divides logits by it
    weight: Optional[np.ndarray] = None  # float32 [b]: each sample's weight in the step (loss.group_weight: equal)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def empty(self) -> bool:
        return len(self.samples) == 0


@dataclass(frozen=True)
class StepTotals:
    """Sums over the whole optimizer step (all ranks, all accumulation micro-batches)."""

    loss_tokens: int
    samples: int
    tokens: int


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    microbatch: int = 0  # next global micro-batch of that epoch (a multiple of G)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "microbatch": self.microbatch}


@dataclass
class Step:
    micro_batches: list[MicroBatch]  # this rank's, `accumulation` of them
    totals: StepTotals
    position: Position  # where the *next* step starts (what a checkpoint after this step records)
    epoch: int
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # whole step, in global order


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
        samples = np.asarray(samples, np.int64)
        lengths = self.lengths[samples]
        b, width = len(samples), int(lengths.max()) if len(samples) else 1
        rl = self.logprobs is not None
        ids = np.empty((b, width), np.int32)
        lp = np.empty((b, width), np.float32) if rl else None
        has = np.empty((b, width), np.uint8) if rl else None
        run_len, run_val, ctx_len, ctx_val, t_len, t_val = [], [], [], [], [], []
        for i, j in enumerate(samples.tolist()):
            d, c0, c1 = 0, self.copy_off[j], self.copy_off[j + 1]
            for src, n in zip(self.copy_src[c0:c1].tolist(), self.copy_len[c0:c1].tolist()):
                ids[i, d:d + n] = self.tokens[src:src + n]
                if rl:
                    lp[i, d:d + n] = self.logprobs[src:src + n]
                    has[i, d:d + n] = self.has_logprob[src:src + n]
                d += n
            pad = width - d
            if pad:
                ids[i, d:] = 0
                if rl:
                    lp[i, d:] = 0
                    has[i, d:] = 0
            r0, r1 = self.run_off[j], self.run_off[j + 1]
            run_len += [self.run_len[r0:r1], [pad]]
            run_val += [self.run_flag[r0:r1], [0]]
            if rl and self.has_ctx:
                r0, r1 = self.ctx_off[j], self.ctx_off[j + 1]
                ctx_len += [self.ctx_len[r0:r1], [pad]]
                ctx_val += [self.ctx_flag[r0:r1], [0]]
            if rl:
                r0, r1 = self.temp_off[j], self.temp_off[j + 1]
                t_len += [self.temp_len[r0:r1], [pad]]
                t_val += [self.temp_val[r0:r1], [1.0]]
        lens = np.concatenate(run_len).astype(np.int64) if b else np.zeros(0, np.int64)
        flags = np.concatenate(run_val).astype(np.uint8) if b else np.zeros(0, np.uint8)
        mask = np.repeat(flags, lens).reshape(b, width) if b else np.zeros((0, width), np.uint8)
        if b:
            mask[:, 0] = 0  # nothing predicts position 0
        adv = same = temp = None
        if rl:
            temp = (np.repeat(np.concatenate(t_val).astype(np.float32), np.concatenate(t_len).astype(np.int64))
                    .reshape(b, width) if b else np.ones((0, width), np.float32))
            same = (np.repeat(np.concatenate(ctx_val).astype(np.uint8), np.concatenate(ctx_len).astype(np.int64))
                    .reshape(b, width) if self.has_ctx and b else has.copy())
            if self.need_behaviour:
                for i in np.flatnonzero(self.n_no_logprob[samples]).tolist():  # text-only imported actions
                    mask[i, :lengths[i]][self._flags(self._lp_nan, int(samples[i]))] = 0  # no ratio: no loss
            adv = np.multiply(mask, self.advantage[samples][:, None], dtype=np.float32)
        return MicroBatch(ids, mask, adv, lp, has, same, samples, lengths, temp)

    def _flags(self, flat: np.ndarray, j: int) -> np.ndarray:
        c0, c1 = self.copy_off[j], self.copy_off[j + 1]
        return np.concatenate([flat[a:a + n] for a, n in zip(self.copy_src[c0:c1], self.copy_len[c0:c1])])


def empty_batch(rl: bool) -> MicroBatch:
    """A stand-in micro-batch (2 pad tokens, no loss): keeps ranks in lockstep at an epoch's end."""
    z = np.zeros((1, 2), np.float32)
    return MicroBatch(np.zeros((1, 2), np.int32), np.zeros((1, 2), np.uint8), z if rl else None, z.copy() if rl else None,
                      np.zeros((1, 2), np.uint8) if rl else None, np.zeros((1, 2), np.uint8) if rl else None,
                      np.zeros(0, np.int64), np.zeros(0, np.int64), np.ones((1, 2), np.float32) if rl else None)


class BatchPlan:
    """Epoch order, packing into global micro-batches, and this rank's share of each optimizer step."""

    def __init__(self, reader: DatasetReader, micro_batch_tokens: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, accumulation: int = 1, group_weight: str = "windows",
                 reduction: str = "token"):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        longest = int(reader.lengths.max()) if len(reader) else 0
        if longest > micro_batch_tokens:
            raise ConfigError(f"data.micro_batch_tokens={micro_batch_tokens} is below the longest sample of "
                              f"{reader.ref} ({longest} tokens; the dataset's max_tokens is {reader.max_tokens}): "
                              "raise data.micro_batch_tokens")
        if not len(reader):
            raise ConfigError(f"{reader.ref} has no samples to train on")
        self.reader, self.budget, self.seed, self.shuffle = reader, micro_batch_tokens, seed, shuffle
        self.rank, self.world, self.accum = rank, world_size, accumulation
        self.group = world_size * accumulation  # global micro-batches per optimizer step
        self.group_weight, self.reduction = group_weight, reduction
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.reader)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def microbatches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global micro-batches (sample numbers), packed greedily in order."""
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        out, cur, width = [], [], 0
        for j, n in zip(*(lambda o: (o.tolist(), self.reader.lengths[o].tolist()))(self.order(epoch))):
            w = max(width, n)
            if cur and (len(cur) + 1) * w > self.budget:
                out.append(np.array(cur, np.int64))
                cur, w = [], n
            cur.append(j)
            width = w
        if cur:
            out.append(np.array(cur, np.int64))
        self._cache = (epoch, out)
        return out

    def steps_in_epoch(self, epoch: int) -> int:
        """Packing differs by epoch (another order), so does the step count."""
        return -(-len(self.microbatches(epoch)) // self.group)

    def total_steps(self, epochs: int, max_steps: Optional[int] = None) -> int:
        total = 0
        for e in range(epochs):
            if max_steps is not None and total >= max_steps:
                break
            total += self.steps_in_epoch(e)
        return total if max_steps is None else min(total, max_steps)

    def group_weights(self, every: np.ndarray) -> np.ndarray:
        """float32 [len(every)], in sorted sample order: weights that make every group of the step weigh 1/G of
        it (G groups) under the reduction: w = total / (G x the group's total), totals in trainable tokens
        (token) or samples (sample, sample_sum). The reduction's own normalisation then gives each group's
        reduced loss the same share, and the weights sum to the step's total (the loss scale is unchanged)."""
        every = np.sort(every)
        _, inv = np.unique(self.reader.group[every], return_inverse=True)
        size = (self.reader.trainable[every].astype(np.float64) if self.reduction == "token"
                else np.ones(len(every)))
        per_group = np.bincount(inv, weights=size)
        w = size.sum() / (len(per_group) * np.maximum(per_group[inv], 1e-12))
        return w.astype(np.float32)

    def steps(self, start: Position = Position(), epochs: Optional[int] = None) -> Iterator[Step]:
        """Optimizer steps from `start` on, through epoch `epochs - 1` (None: forever)."""
        if start.microbatch % self.group:
            raise ConfigError(f"resume position {start.to_dict()} is not at a step boundary of "
                              f"{self.group} micro-batches per step (world size x engine.gradient_accumulation_steps "
                              "must divide it: resume with the step size the run had)")
        epoch, k = start.epoch, start.microbatch
        rl = self.reader.kind == "rl"
        while epochs is None or epoch < epochs:
            mbs = self.microbatches(epoch)
            while k < len(mbs):
                group = mbs[k:k + self.group]
                mine = [group[i] if i < len(group) else None
                        for i in range(self.rank, self.group, self.world)]
                every = np.concatenate(group)
                totals = StepTotals(int(self.reader.trainable[every].sum()), len(every),
                                    int(self.reader.lengths[every].sum()))
                k += self.group
                nxt = Position(epoch, k) if k < len(mbs) else Position(epoch + 1, 0)
                batches = [empty_batch(rl) if m is None else self.reader.batch(m) for m in mine]
                if self.group_weight == "equal":  # weights over the whole step (every rank computes the same)
                    order, w = np.sort(every), self.group_weights(every)
                    batches = [b if m is None else replace(b, weight=w[np.searchsorted(order, m)])
                               for b, m in zip(batches, mine)]
                yield Step(batches, totals, nxt, epoch, every)
            epoch, k = epoch + 1, 0
