"""One micro-batch -> its share of the step loss and the sums the step's metrics are made of (SFT or RL).

    obj = Objective(cfg, rl=True, ref=frozen_input_policy)
    loss, sums, maxes = obj(policy_model, mb, norm)       # then backward; sums add up over micro-batches/ranks
    metrics = obj.metrics(sums, maxes, loss_tokens)       # after the step: means over the step's loss tokens

The policy's log-probs (and, for RL, entropies) come from its last hidden states and output layer in chunks
(`trainer.losses.head_logprobs`, `loss.logit_chunk_tokens`): no [b, T, V] tensor is held. RL takes them at the
temperature each token was sampled at (logits / T, per token from the dataset: `MicroBatch.temperature`), so
policy, old and reference log-probs, the ratio, KL, entropy and `mismatch` all describe the distribution the
sampler drew from (vLLM's processed logprobs, `klong serve`); SFT trains the plain (T = 1) likelihood.

RL, `loss.old_logprobs`:
  recompute  (default) old logprobs = the frozen input policy (eq. 7's pi_ref, the model the run started
             from) on the window's own input, in a no-grad pass. At the first step theta = theta_old on the
             same tokens and context, so r = 1 and KL = 0 whatever context the runner generated under
             (a pruned history, an earlier window). Loss tokens without a behaviour logprob are trained.
  behaviour  old logprobs = the stored behaviour logprobs (the sampler's, under its own context); loss tokens
             without one are left out (trainer.data).
Behaviour logprobs stay for metrics and, with `loss.tis_cap`, a truncated importance weight
min(pi_old / pi_behaviour, cap) on each token (a correction for sampler/trainer mismatch).
Metrics (per step, into `training_metrics`): pg_loss, kl (k3 vs the input policy, or full), clip_frac,
ratio_mean, ratio_max, entropy (of the policy's next-token distributions, mean over loss tokens), mismatch
(mean |logp_old - logp_behaviour| over loss tokens with a behaviour logprob whose window context equals the
context they were generated in: the builder's span_same_ctx/prefix_same_ctx; there the two differ only by
numerics, e.g. 1e-5 for a float32 vLLM), mismatch_tokens, and is_weight_mean with tis_cap.
"""

from __future__ import annotations

from typing import Optional

import torch

from trainer.config import RunConfig
from trainer.losses import (Norm, head_kl_full, head_logprobs, kl_k3, rl_loss, sft_loss, truncated_is_weight)
from trainer.model import body

RL_SUMS = ("pg_sum", "kl_sum", "clipped", "ratio_sum", "entropy_sum", "mismatch_sum", "mismatch_tokens", "is_sum")


def hidden_and_head(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
    """[b, T] ids -> (last hidden states [b, T, H], the output layer). Right padding needs no attention mask:
    attention is causal, so pads never reach real tokens."""
    return body(model)(input_ids=ids).last_hidden_state, model.get_output_embeddings()


class Objective:
    def __init__(self, cfg: RunConfig, rl: bool, ref: Optional[torch.nn.Module] = None):
        self.cfg, self.loss, self.rl, self.ref = cfg, cfg.loss, rl, ref
        self.recompute = rl and cfg.loss.old_logprobs == "recompute"
        if (self.recompute or (rl and cfg.loss.beta > 0)) and ref is None:
            raise ValueError("recomputed old logprobs and the KL term need the frozen input policy (ref)")

    @property
    def sum_keys(self) -> tuple[str, ...]:
        return RL_SUMS if self.rl else ("nll_sum",)

    def __call__(self, model: torch.nn.Module, mb, norm: Norm) -> tuple[torch.Tensor, dict, dict]:
        dev = next(model.parameters()).device
        lc, chunk = self.loss, self.loss.logit_chunk_tokens
        ids = torch.from_numpy(mb.input_ids).to(dev).long()
        mask = torch.from_numpy(mb.loss_mask[:, 1:]).to(dev).float()  # aligned to the predicted token
        hidden, head = hidden_and_head(model, ids)
        # RL: log-probs of the distribution each token was sampled from, softmax(logits / its temperature)
        temp = (torch.from_numpy(mb.temperature[:, 1:]).to(dev)
                if self.rl and mb.temperature is not None else None)
        logp, ent = head_logprobs(hidden, head, ids, chunk=chunk, entropy=self.rl, temperature=temp)
        weight = None if mb.weight is None else torch.from_numpy(mb.weight).to(dev)  # loss.group_weight: equal
        if not self.rl:
            loss, st = sft_loss(logp, mask, norm, weight)
            return loss, {"nll_sum": float(st["nll_sum"])}, {}
        behaviour = torch.from_numpy(mb.logprobs[:, 1:]).to(dev)
        has = torch.from_numpy(mb.has_logprob[:, 1:]).to(dev).float() * mask
        same = torch.from_numpy(mb.same_ctx[:, 1:]).to(dev).float() * has  # where logp_old and behaviour can agree
        ref_logp = ref_hidden = None
        if self.ref is not None:
            with torch.no_grad():
                ref_hidden, ref_head = hidden_and_head(self.ref, ids)
                ref_logp, _ = head_logprobs(ref_hidden, ref_head, ids, chunk=chunk, temperature=temp)
        old = ref_logp if self.recompute else behaviour
        kl = None
        if ref_logp is not None:
            kl = (head_kl_full(hidden, head, ref_hidden, ref_head, chunk=chunk, temperature=temp)
                  if lc.kl_estimator == "full" and lc.beta > 0 else kl_k3(logp, ref_logp))
        is_w = truncated_is_weight(old, behaviour, has, lc.tis_cap) if lc.tis_cap is not None else None
        loss, st = rl_loss(logp, old, torch.from_numpy(mb.advantage[:, 1:]).to(dev), mask, norm,
                           clip_eps=lc.clip_eps, dual_clip=lc.dual_clip, beta=lc.beta, kl=kl, is_weight=is_w,
                           weight=weight)
        sums = {k: float(st[k]) for k in ("pg_sum", "clipped", "ratio_sum")}
        sums["kl_sum"] = float(st.get("kl_sum", 0.0))
        sums["entropy_sum"] = float((ent * mask).sum())
        mismatch_ref = ref_logp if ref_logp is not None else None  # the input policy's logprob, when it was run
        sums["mismatch_sum"] = float(((mismatch_ref - behaviour).abs() * same).sum()) if mismatch_ref is not None else 0.0
        sums["mismatch_tokens"] = float(same.sum()) if mismatch_ref is not None else 0.0
        sums["is_sum"] = float((is_w * mask).sum()) if is_w is not None else 0.0
        return loss, sums, {"ratio_max": float(st["ratio_max"])}

    def metrics(self, sums: dict, maxes: dict, loss_tokens: int) -> dict:
        """Step totals (over every micro-batch and rank) -> per-token means."""
        n = max(loss_tokens, 1)
        if not self.rl:
            return {"nll": sums["nll_sum"] / n}
        m = {"pg_loss": sums["pg_sum"] / n, "clip_frac": sums["clipped"] / n, "ratio_mean": sums["ratio_sum"] / n,
             "ratio_max": maxes.get("ratio_max", 0.0), "entropy": sums["entropy_sum"] / n}
        if self.ref is not None:
            m["kl"] = sums["kl_sum"] / n
            m["mismatch_tokens"] = sums["mismatch_tokens"]
            if sums["mismatch_tokens"]:
                m["mismatch"] = sums["mismatch_sum"] / sums["mismatch_tokens"]
        if self.loss.tis_cap is not None:
            m["is_weight_mean"] = sums["is_sum"] / n
        return m
