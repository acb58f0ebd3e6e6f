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

The parts: trainer.reader (DatasetReader: the version into flat arrays), trainer.batch (MicroBatch, Step,
Position, the micro-batch assembly), trainer.packing (BatchPlan: order, packing, sharding). This module
re-exports them under the names the trainer, bench/ and the docs use.
"""

from trainer.batch import MicroBatch, Position, Step, StepTotals, assemble, empty_batch
from trainer.packing import BatchPlan
from trainer.reader import DatasetReader

__all__ = ["BatchPlan", "DatasetReader", "MicroBatch", "Position", "Step", "StepTotals", "assemble", "empty_batch"]
