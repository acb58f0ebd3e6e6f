"""Loss math: splitting SFT (KLong eq. 6) and the progressive-RL objective (eq. 7-8), on per-token tensors.

    logp, ent = head_logprobs(hidden, head, input_ids, chunk=1024, entropy=True)   # [b, T-1] each
    loss, stats = sft_loss(logp, mask, norm)
    loss, stats = rl_loss(logp, old_logp, adv, mask, norm, clip_eps=0.2, dual_clip=3.0, beta=0.01, kl=k3)

Everything is aligned to the *target* token: column t - 1 of the shifted tensors is token t of the input.

Log-probs in chunks. `head_logprobs` takes the model's last hidden states [b, T, H] and its output layer,
and computes the log-probability of each next token (and the entropy of each next-token distribution)
`chunk` positions at a time under activation checkpointing: the float32 logits of one chunk [chunk, V]
exist at a time, in the forward pass and again, recomputed, in the backward pass. The last chunk is not
checkpointed: its logits stay from forward to backward (one chunk's worth, which the backward pass would
recompute anyway), so a micro-batch that fits one chunk computes the output layer once, as a plain loop
does. No [b, T, V] tensor is held (at 32k tokens x 150k vocabulary that tensor alone is ~20 GB). `chunk=0`
takes all positions at once (the classical full-logits way; `bench/alignment.py` compares the two).
The log-prob of a chunk is torch's fused cross entropy, whose backward is one pass over the chunk's logits.

Reduction (`loss.reduction`), over one optimizer step (all ranks and accumulation micro-batches, via
`Norm`, so a step's loss does not depend on how it is split across processes):

    token       sum of per-token terms / loss tokens in the step (every trained token weighs the same)
    sample      per-sample mean over its tokens, then / samples in the step (every window weighs the same)
    sample_sum  per-sample sum, / samples in the step: eq. 7 literally, 1/(nK) sum_i sum_t

RL per token: ratio r = exp(logp - old_logp) (eq. 8), old_logp being either the frozen input policy's
logprob recomputed on the window's own input or the stored behaviour logprob (`loss.old_logprobs`);
surrogate min(r A, clip(r, 1-eps, 1+eps) A) (eq. 7); for A < 0 the dual clip bounds it below by c A
(c = `loss.dual_clip`, stale data cannot push a token's loss without bound); optionally times a
truncated importance weight min(pi_old / pi_behaviour, cap) (detached); loss = -surrogate.
The log-ratio is clamped to +-LOG_RATIO_CLAMP before exp, so an old logprob of -100 gives a large
but finite ratio, never inf or NaN. The KL term is beta * E_t[KL] as eq. 7 writes it: a mean over the
step's loss tokens whatever the reduction. KL(pi_theta || pi_ref): `k3` estimates it from the sampled
tokens, exp(ref - logp) - (ref - logp) - 1 (>= 0; its log-ratio clamped and the value capped at KL_CLAMP).
Its *value* is an unbiased estimate of KL(pi_theta || pi_ref) on tokens sampled from pi_theta; its *gradient*,
as a loss on those tokens, is (1 - pi_ref / pi_theta) grad log pi_theta, whose expectation is the gradient of
KL(pi_ref || pi_theta), the reverse direction (as in GRPO and verl's `low_var_kl`): the metric reads
KL(pi || pi_ref), the penalty pulls towards pi_ref in the other sense. `full` computes KL(pi_theta || pi_ref)
exactly over the vocabulary, in chunks (`head_kl_full`), value and gradient alike. RL takes every log-prob at
the temperature the token was sampled at (`temperature=`: softmax(logits / T)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOG_RATIO_CLAMP = 20.0  # |log r| and |ref - logp| at most this: exp(20) ~ 4.9e8, finite in float32
KL_CLAMP = 10.0  # a token's k3 at most this


@dataclass(frozen=True)
class Norm:
    """Denominators for one optimizer step (global: summed over ranks and micro-batches)."""

    reduction: str  # token | sample | sample_sum
    loss_tokens: int
    samples: int


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """logits [b, T, V], input_ids [b, T] -> float32 [b, T-1]: log-probability of each next token."""
    b, t, v = logits.shape
    return -F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1).long(),
                            reduction="none").view(b, t - 1)


def _chunk_logprobs(head: Callable, entropy: bool, h: torch.Tensor, target: torch.Tensor,
                    temp: Optional[torch.Tensor] = None):
    """One chunk: hidden [n, H], target [n], temperature [n] or None -> (logp [n], entropy [n] or an empty
    tensor), float32, of the distribution softmax(logits / temperature)."""
    logits = head(h).float()
    if temp is not None:
        logits = logits / temp[:, None]
    logp = -F.cross_entropy(logits, target, reduction="none")  # fused: one [n, V] pass back, like the model's loss
    if not entropy:
        return logp, logits.new_zeros(0)
    with torch.no_grad():  # a metric: no gradient, nothing saved for backward
        ent = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    return logp, ent


def head_logprobs(hidden: torch.Tensor, head: Callable, input_ids: torch.Tensor, *, chunk: int,
                  entropy: bool = False, temperature: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """hidden [b, T, H] (last layer, normed), head: the output layer (hidden -> logits), input_ids [b, T] ->
    (logp float32 [b, T-1], entropy float32 [b, T-1] or None). `chunk` positions per piece (0: all at once);
    with gradients on, each piece runs under activation checkpointing (its logits recomputed in backward).
    `temperature` [b, T-1] (aligned to the target token, like the outputs) or None (1): the log-probs are those
    of softmax(logits / T), the distribution the token was sampled from."""
    b, t, hd = hidden.shape
    h = hidden[:, :-1].reshape(-1, hd)
    target = input_ids[:, 1:].reshape(-1).long()
    temp = None if temperature is None else temperature.reshape(-1).float()
    n = h.shape[0]
    step = n if chunk <= 0 else chunk
    grad = torch.is_grad_enabled() and h.requires_grad
    logps, ents = [], []
    for lo in range(0, n, max(step, 1)):
        args = (head, entropy, h[lo:lo + step], target[lo:lo + step], None if temp is None else temp[lo:lo + step])
        last = lo + step >= n  # its logits may stay for backward: recomputed, they would exist then anyway
        lp, ent = (checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad and chunk > 0 and not last
                   else _chunk_logprobs(*args))
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps).view(b, t - 1) if logps else hidden.new_zeros(b, max(t - 1, 0), dtype=torch.float32)
    ent = (torch.cat(ents).view(b, t - 1) if logps else torch.zeros_like(logp)) if entropy else None
    return logp, ent


def _chunk_kl_full(head: Callable, ref_head: Callable, h: torch.Tensor, ref_h: torch.Tensor,
                   temp: Optional[torch.Tensor] = None) -> torch.Tensor:
    div = 1.0 if temp is None else temp[:, None]
    lp = F.log_softmax(head(h).float() / div, -1)
    with torch.no_grad():
        ref = F.log_softmax(ref_head(ref_h).float() / div, -1)
    return (lp.exp() * (lp - ref)).sum(-1)


def head_kl_full(hidden: torch.Tensor, head: Callable, ref_hidden: torch.Tensor, ref_head: Callable, *,
                 chunk: int, temperature: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact KL(pi || pi_ref) per position over the vocabulary, from both models' hidden states [b, T, H],
    `chunk` positions at a time -> float32 [b, T-1] (both distributions at `temperature` [b, T-1], as sampled)."""
    b, t, hd = hidden.shape
    h, rh = hidden[:, :-1].reshape(-1, hd), ref_hidden[:, :-1].reshape(-1, ref_hidden.shape[-1])
    tp = None if temperature is None else temperature.reshape(-1).float()
    step = max(h.shape[0] if chunk <= 0 else chunk, 1)
    grad = torch.is_grad_enabled() and h.requires_grad
    part = lambda lo: (head, ref_head, h[lo:lo + step], rh[lo:lo + step], None if tp is None else tp[lo:lo + step])  # noqa: E731
    out = [checkpoint(_chunk_kl_full, *part(lo), use_reentrant=False)
           if grad and chunk > 0 else _chunk_kl_full(*part(lo))
           for lo in range(0, h.shape[0], step)]
    return torch.cat(out).view(b, t - 1) if out else hidden.new_zeros(b, max(t - 1, 0), dtype=torch.float32)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """logits [b, T, V] -> float32 [b, T-1]: entropy of each next-token distribution (the full-logits way)."""
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    return -(lp.exp() * lp).sum(-1)


def reduce(per_token: torch.Tensor, mask: torch.Tensor, norm: Norm, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of this micro-batch's share of the step loss (see the module docstring). `weight` [b]: each sample's
    weight (`loss.group_weight: equal`, trainer.data.BatchPlan.group_weights); None: 1."""
    masked = per_token * mask
    if norm.reduction == "token" and weight is None:
        return masked.sum() / max(norm.loss_tokens, 1)
    per_sample = masked.sum(-1)
    if norm.reduction == "sample":
        per_sample = per_sample / mask.sum(-1).clamp(min=1)
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.sum() / max(norm.loss_tokens if norm.reduction == "token" else norm.samples, 1)


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, norm: Norm,
             weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """Eq. 6: negative log-likelihood of the actions (mask = 1 on the sampled ids of assistant steps)."""
    loss = reduce(-logp, mask, norm, weight)
    nll_sum = (-logp * mask).sum().detach()
    return loss, {"nll_sum": nll_sum}


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi || pi_ref) per sampled token, log-ratio clamped and value capped (finite always).
    The value is unbiased for KL(pi || pi_ref); the gradient is that of KL(pi_ref || pi) (module docstring)."""
    d = torch.clamp(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(d) - d - 1, max=KL_CLAMP)


def kl_full(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi || pi_ref) per position over the vocabulary: [b, T, V] x2 -> [b, T-1] (next-token dists)."""
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    ref = F.log_softmax(ref_logits[:, :-1].float(), -1)
    return (lp.exp() * (lp - ref)).sum(-1)


def truncated_is_weight(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, has_behaviour: torch.Tensor,
                        cap: float) -> torch.Tensor:
    """min(pi_old / pi_behaviour, cap) per token (1 where no behaviour logprob was recorded), no gradient."""
    d = torch.clamp(old_logp - behaviour_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.where(has_behaviour > 0, torch.clamp(torch.exp(d), max=cap), torch.ones_like(d)).detach()


def rl_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, norm: Norm, *,
            clip_eps: float, dual_clip: Optional[float] = None, beta: float = 0.0, kl: Optional[torch.Tensor] = None,
            is_weight: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """Eq. 7: clipped surrogate (dual-clipped for A < 0 when `dual_clip`, weighted by `is_weight` when given)
    + beta * KL. `kl`: per-token KL [b, T-1] (k3 or full); its sum is reported whenever it is given, and it
    joins the loss when beta > 0. Returns the loss and detached sums (and the max ratio) for metrics."""
    ratio = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    if dual_clip is not None:  # A < 0: max(min(r A, clip(r) A), c A) -- a bounded loss for r >> 1
        surrogate = torch.where(adv < 0, torch.maximum(surrogate, dual_clip * adv), surrogate)
    if is_weight is not None:
        surrogate = surrogate * is_weight
    loss = reduce(-surrogate, mask, norm, weight)
    on = mask > 0
    unclipped = ratio * adv * (is_weight if is_weight is not None else 1.0)
    stats = {"pg_sum": (-surrogate * mask).sum().detach(), "ratio_sum": (ratio * mask).sum().detach(),
             "ratio_max": (ratio.detach()[on].max() if on.any() else ratio.new_zeros(())),
             "clipped": ((surrogate != unclipped) & on).sum().detach()}
    if beta > 0 and kl is None:
        raise ValueError("beta > 0 needs the per-token KL to the reference policy")
    if kl is not None:
        stats["kl_sum"] = (kl * mask).sum().detach()
        if beta > 0:
            loss = loss + beta * (kl * mask).sum() / max(norm.loss_tokens, 1)
    return loss, stats
