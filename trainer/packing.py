"""Epoch order, packing and sharding: which samples each rank trains in each optimizer step.

    plan = BatchPlan(reader, micro_batch_tokens=8192, seed=0, rank=r, world_size=w, accumulation=a)
    for step in plan.steps(Position()):      # step.micro_batches: this rank's, len == a; step.totals: the step's

An epoch's order is a permutation drawn from (seed, epoch). Samples are packed in that order into *global*
micro-batches of at most `micro_batch_tokens` padded tokens (rows x longest row). One optimizer step takes
G = world_size x accumulation consecutive global micro-batches; rank r runs those at positions r, r + W, ...
So the packing, and what a step holds, do not depend on W. The epoch's last step is filled with empty
micro-batches so every rank runs the same number of passes; each step carries the *global* totals the loss
is normalized by. The position (epoch, next global micro-batch) is all a checkpoint needs to continue.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Optional

import numpy as np

from schemas.errors import ConfigError
from trainer.batch import Position, Step, StepTotals, empty_batch
from trainer.reader import DatasetReader


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

