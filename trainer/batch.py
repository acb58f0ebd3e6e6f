"""Micro-batches and optimizer steps as the trainer receives them, and their assembly from a reader.

    mb = assemble(reader, np.array([3, 7]))    # two samples of a DatasetReader -> one right-padded MicroBatch
    mb.input_ids, mb.loss_mask, mb.advantage   # [b, T] each

`assemble` copies each sample's *copy ranges* (runs of tokens contiguous in storage) into its row and expands
the loss/context/temperature *runs* with one np.repeat each: no per-token Python. Position 0 never carries loss
(no logit predicts it); in rl batches a loss token without a behaviour logprob carries none either when the
ratio divides by it (`reader.need_behaviour`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


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


def assemble(reader, samples: np.ndarray) -> MicroBatch:
    """Samples of `reader` (a DatasetReader) -> one right-padded micro-batch: per sample a few slice copies
    along its copy ranges, its masks expanded from run lengths with one np.repeat."""
    samples = np.asarray(samples, np.int64)
    lengths = reader.lengths[samples]
    b, width = len(samples), int(lengths.max()) if len(samples) else 1
    rl = reader.logprobs is not None
    ids = np.empty((b, width), np.int32)
    lp = np.empty((b, width), np.float32) if rl else None
    has = np.empty((b, width), np.uint8) if rl else None
    run_len, run_val, ctx_len, ctx_val, t_len, t_val = [], [], [], [], [], []
    for i, j in enumerate(samples.tolist()):
        d, c0, c1 = 0, reader.copy_off[j], reader.copy_off[j + 1]
        for src, n in zip(reader.copy_src[c0:c1].tolist(), reader.copy_len[c0:c1].tolist()):
            ids[i, d:d + n] = reader.tokens[src:src + n]
            if rl:
                lp[i, d:d + n] = reader.logprobs[src:src + n]
                has[i, d:d + n] = reader.has_logprob[src:src + n]
            d += n
        pad = width - d
        if pad:
            ids[i, d:] = 0
            if rl:
                lp[i, d:] = 0
                has[i, d:] = 0
        r0, r1 = reader.run_off[j], reader.run_off[j + 1]
        run_len += [reader.run_len[r0:r1], [pad]]
        run_val += [reader.run_flag[r0:r1], [0]]
        if rl and reader.has_ctx:
            r0, r1 = reader.ctx_off[j], reader.ctx_off[j + 1]
            ctx_len += [reader.ctx_len[r0:r1], [pad]]
            ctx_val += [reader.ctx_flag[r0:r1], [0]]
        if rl:
            r0, r1 = reader.temp_off[j], reader.temp_off[j + 1]
            t_len += [reader.temp_len[r0:r1], [pad]]
            t_val += [reader.temp_val[r0:r1], [1.0]]
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
                .reshape(b, width) if reader.has_ctx and b else has.copy())
        if reader.need_behaviour:
            for i in np.flatnonzero(reader.n_no_logprob[samples]).tolist():  # text-only imported actions
                mask[i, :lengths[i]][reader._flags(reader._lp_nan, int(samples[i]))] = 0  # no ratio: no loss
        adv = np.multiply(mask, reader.advantage[samples][:, None], dtype=np.float32)
    return MicroBatch(ids, mask, adv, lp, has, same, samples, lengths, temp)


def empty_batch(rl: bool) -> MicroBatch:
    """A stand-in micro-batch (2 pad tokens, no loss): keeps ranks in lockstep at an epoch's end."""
    z = np.zeros((1, 2), np.float32)
    return MicroBatch(np.zeros((1, 2), np.int32), np.zeros((1, 2), np.uint8), z if rl else None, z.copy() if rl else None,
                      np.zeros((1, 2), np.uint8) if rl else None, np.zeros((1, 2), np.uint8) if rl else None,
                      np.zeros(0, np.int64), np.zeros(0, np.int64), np.ones((1, 2), np.float32) if rl else None)

