"""trainer.losses against values computed by hand (eq. 6-8): clipping on both sides, masked tokens,
the three reductions, both KL estimators; clamps and the dual clip on extreme inputs; chunked log-probs,
entropies, gradients and full KL equal the full-logits ones."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import (KL_CLAMP, LOG_RATIO_CLAMP, Norm, head_kl_full, head_logprobs, kl_full, kl_k3, reduce,
                            rl_loss, sft_loss, token_entropy, token_logprobs, truncated_is_weight)

L = math.log


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_token_logprobs_align_to_the_next_token():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(5.0)  # position 0 predicts token 1: p(2) = 5/8
    logits[0, 1, 1] = math.log(3.0)  # position 1 predicts token 2: p(3) = 1/6
    lp = token_logprobs(logits, torch.tensor([[0, 2, 3]]))
    assert lp.shape == (1, 2)
    assert lp[0, 0].item() == pytest.approx(L(5 / 8)) and lp[0, 1].item() == pytest.approx(L(1 / 6))


def test_sft_nll_over_the_mask_with_each_reduction():
    logp = t([[L(0.5), L(0.25), L(0.1)], [L(0.8), 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])  # the 0.1 token and the padding carry no loss
    nll = [L(2), L(4), L(1 / 0.8)]
    loss, _ = sft_loss(logp, mask, Norm("token", loss_tokens=3, samples=2))
    assert loss.item() == pytest.approx(sum(nll) / 3)
    loss, _ = sft_loss(logp, mask, Norm("sample", loss_tokens=3, samples=2))
    assert loss.item() == pytest.approx(((nll[0] + nll[1]) / 2 + nll[2]) / 2)
    loss, _ = sft_loss(logp, mask, Norm("sample_sum", loss_tokens=3, samples=2))
    assert loss.item() == pytest.approx((nll[0] + nll[1] + nll[2]) / 2)
    # a micro-batch's share of a bigger step: divided by the *step's* totals
    loss, _ = sft_loss(logp, mask, Norm("token", loss_tokens=6, samples=4))
    assert loss.item() == pytest.approx(sum(nll) / 6)


def test_ppo_clipped_surrogate_by_hand():
    old = t([[L(0.5)] * 4])
    # ratios 1.5, 0.5, 1.1, 0.6 with advantages +1, -1, +2, +1, clip eps 0.2
    logp = (old.exp() * t([[1.5, 0.5, 1.1, 0.6]])).log()
    adv = t([[1.0, -1.0, 2.0, 1.0]])
    mask = t([[1, 1, 1, 1]])
    # A>0, r=1.5 -> clipped at 1.2: 1.2;  A<0, r=0.5 -> clipped at 0.8: min(-0.5, -0.8) = -0.8
    # A>0, r=1.1 inside: 2.2;  A>0, r=0.6 below 1-eps: min(0.6, 0.8) = 0.6 (no clip benefit)
    surrogate = [1.2, -0.8, 2.2, 0.6]
    loss, st = rl_loss(logp, old, adv, mask, Norm("token", 4, 1), clip_eps=0.2)
    assert loss.item() == pytest.approx(-sum(surrogate) / 4, rel=1e-5)
    assert st["clipped"].item() == 2  # the first two took the clipped branch
    # gradient flows only through the unclipped tokens
    logp = logp.clone().requires_grad_(True)
    rl_loss(logp, old, adv, mask, Norm("token", 4, 1), clip_eps=0.2)[0].backward()
    g = logp.grad[0]
    assert g[0].item() == 0 and g[1].item() == 0
    assert g[2].item() == pytest.approx(-2.0 * 1.1 / 4, rel=1e-5) and g[3].item() == pytest.approx(-0.6 / 4, rel=1e-5)


def test_masked_tokens_do_not_count_and_kl_is_a_token_mean():
    old = t([[-1.0, -1.0, -1.0]])
    logp = t([[-0.5, -2.0, -0.1]])
    ref = t([[-1.0, -1.0, -9.0]])
    adv = t([[1.0, 1.0, 100.0]])
    mask = t([[1, 1, 0]])  # the third token is masked: its huge advantage and KL must not matter
    kl = kl_k3(logp, ref)
    r = [math.exp(0.5), math.exp(-1.0)]
    surrogate = [min(r[0], 1.2), r[1]]  # A = 1 > 0: r0 clipped at 1.2; r1 = 0.37 below 0.8, unclipped
    k3 = [math.exp(-0.5) - (-0.5) - 1, math.exp(1.0) - 1.0 - 1]  # exp(d) - d - 1, d = ref - logp
    loss, st = rl_loss(logp, old, adv, mask, Norm("sample_sum", 2, 1), clip_eps=0.2, beta=0.1, kl=kl)
    assert loss.item() == pytest.approx(-sum(surrogate) / 1 + 0.1 * sum(k3) / 2, rel=1e-5)
    assert st["kl_sum"].item() == pytest.approx(sum(k3), rel=1e-5)
    with pytest.raises(ValueError, match="KL"):
        rl_loss(logp, old, adv, mask, Norm("token", 2, 1), clip_eps=0.2, beta=0.1)


def test_full_kl_over_the_vocabulary():
    p, q = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]
    logits = torch.tensor([[[L(x) for x in p], [0.0] * 3]])
    ref = torch.tensor([[[L(x) for x in q], [0.0] * 3]])
    want = sum(a * L(a / b) for a, b in zip(p, q))
    got = kl_full(logits, ref)
    assert got.shape == (1, 1) and got.item() == pytest.approx(want, rel=1e-5)
    assert kl_full(logits, logits).abs().max().item() < 1e-6
    assert (kl_k3(t([[-0.3, -2.0]]), t([[-0.3, -2.0]])) == 0).all()


def test_reduce_with_an_empty_step_is_zero_not_nan():
    z = reduce(torch.ones(1, 2), torch.zeros(1, 2), Norm("token", 0, 0))
    assert z.item() == 0


def test_extreme_old_logprobs_stay_finite_and_the_dual_clip_bounds_negative_advantages():
    # an old logprob of -100 (a token the sampler almost never picks) against logp -1: log r = 99
    logp = t([[-1.0, -1.0, -1.0, -0.5]]).requires_grad_(True)
    old = t([[-100.0, -100.0, float("-inf"), -0.5]])
    adv = t([[1.0, -1.0, -2.0, 0.5]])
    mask = t([[1, 1, 1, 1]])
    kl = kl_k3(logp, t([[-100.0, 0.0, -1.0, -0.5]]))
    loss, st = rl_loss(logp, old, adv, mask, Norm("token", 4, 1), clip_eps=0.2, dual_clip=3.0, beta=0.1, kl=kl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and torch.isfinite(kl).all()
    assert st["ratio_max"].item() == pytest.approx(math.exp(LOG_RATIO_CLAMP), rel=1e-4)  # clamped, not exp(99)
    assert kl.max().item() <= KL_CLAMP
    # A>0, r huge: clipped at 1.2; A<0, r huge: bounded by the dual clip at 3 A; r = 1 on the last token
    surrogate = [1.2, -3.0, -6.0, 0.5]
    pg = -sum(surrogate) / 4
    assert loss.item() == pytest.approx(pg + 0.1 * kl.sum().item() / 4, rel=1e-5)
    assert st["clipped"].item() == 3
    # without the dual clip the same step is a loss of ~1e9
    loss2, _ = rl_loss(logp.detach(), old, adv, mask, Norm("token", 4, 1), clip_eps=0.2)
    assert loss2.item() > 1e8 and torch.isfinite(loss2)


def test_dual_clip_only_acts_below_c_times_a():
    old = t([[L(0.5)] * 3])
    logp = (old.exp() * t([[0.5, 2.0, 5.0]])).log()  # ratios 0.5, 2, 5; A = -1 everywhere
    adv = t([[-1.0, -1.0, -1.0]])
    # r=0.5: max(-0.5, -0.8) = -0.5 ... min picks -0.8 (clipped at 0.8), above -3: kept; r=2: -2 (unclipped branch,
    # above -3: kept); r=5: -5 < -3: dual-clipped to -3 (and its gradient is cut)
    loss, st = rl_loss(logp, old, adv, t([[1, 1, 1]]), Norm("token", 3, 1), clip_eps=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx((0.8 + 2.0 + 3.0) / 3, rel=1e-5)
    logp = logp.clone().requires_grad_(True)
    rl_loss(logp, old, adv, t([[1, 1, 1]]), Norm("token", 3, 1), clip_eps=0.2, dual_clip=3.0)[0].backward()
    assert logp.grad[0, 0].item() == 0 and logp.grad[0, 2].item() == 0
    assert logp.grad[0, 1].item() == pytest.approx(2.0 / 3, rel=1e-5)


def test_truncated_importance_weight_caps_and_skips_tokens_without_a_behaviour_logprob():
    old, beh = t([[-1.0, -1.0, -1.0]]), t([[-1.5, -0.5, 0.0]])
    w = truncated_is_weight(old, beh, t([[1, 1, 0]]), cap=1.5)
    assert w[0].tolist() == pytest.approx([1.5, math.exp(-0.5), 1.0], rel=1e-5)  # e^0.5 = 1.65 capped at 1.5


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_logprobs_and_gradients_equal_the_full_logits(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 13, 16, requires_grad=True)
    ids = torch.randint(0, 50, (2, 13))
    logits = head(hidden)
    want_lp, want_ent = token_logprobs(logits, ids), token_entropy(logits)
    (want_lp * torch.linspace(0, 1, 12)).sum().backward()
    want_gh, want_gw = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    lp, ent = head_logprobs(hidden, head, ids, chunk=chunk, entropy=True)
    (lp * torch.linspace(0, 1, 12)).sum().backward()
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, want_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, want_gw, rtol=1e-5, atol=1e-6)
    ref_head = torch.nn.Linear(16, 50, bias=False)
    ref_hidden = torch.randn(2, 13, 16)
    torch.testing.assert_close(head_kl_full(hidden, head, ref_hidden, ref_head, chunk=chunk),
                               kl_full(head(hidden), ref_head(ref_hidden)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 1, 5])
def test_logprobs_are_taken_at_the_temperature_each_token_was_sampled_at(chunk):
    """RL's log-probs are those of softmax(logits / T) with T per target token (the sampler's distribution):
    value, entropy, gradients and the full KL, chunked or not."""
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 13, 16, requires_grad=True)
    ids = torch.randint(0, 50, (2, 13))
    temp = torch.full((2, 12), 0.7)
    temp[1, :4] = 1.0  # steps of one window may differ
    scaled = head(hidden)[:, :-1] / temp[..., None]  # the distribution each target token was sampled from
    want_lp = torch.log_softmax(scaled, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    want_ent = -(torch.softmax(scaled, -1) * torch.log_softmax(scaled, -1)).sum(-1)
    want_lp.sum().backward()
    want_gh = hidden.grad.clone()
    hidden.grad = None
    lp, ent = head_logprobs(hidden, head, ids, chunk=chunk, entropy=True, temperature=temp)
    lp.sum().backward()
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, want_gh, rtol=1e-5, atol=1e-6)
    ones, _ = head_logprobs(hidden, head, ids, chunk=chunk, temperature=torch.ones(2, 12))
    torch.testing.assert_close(ones, token_logprobs(head(hidden), ids), rtol=1e-5, atol=1e-5)
    ref_head, ref_hidden = torch.nn.Linear(16, 50, bias=False), torch.randn(2, 13, 16)
    ref_scaled = ref_head(ref_hidden)[:, :-1] / temp[..., None]
    want_kl = (torch.softmax(scaled, -1) * (torch.log_softmax(scaled, -1) - torch.log_softmax(ref_scaled, -1))).sum(-1)
    torch.testing.assert_close(head_kl_full(hidden, head, ref_hidden, ref_head, chunk=chunk, temperature=temp),
                               want_kl, rtol=1e-5, atol=1e-6)


def test_temperature_changes_the_ratio_the_way_the_issue_measured():
    """Logits [2, 1, 0] sampled at T = 0.7: pi_T1 / pi_T0.7 = [0.86, 1.33, 2.03], not 1 (what T = 1 alone sees)."""
    head = lambda h: h  # noqa: E731  (the hidden state is the logits)
    hidden = torch.tensor([[[2.0, 1.0, 0.0]] * 4])
    ids = torch.tensor([[0, 0, 1, 2]])
    at_1, _ = head_logprobs(hidden, head, ids, chunk=0)
    at_07, _ = head_logprobs(hidden, head, ids, chunk=0, temperature=torch.full((1, 3), 0.7))
    assert torch.exp(at_1 - at_07)[0].tolist() == pytest.approx([0.86, 1.33, 2.03], abs=0.01)


def test_sample_weights_scale_each_samples_share_of_the_reduction():
    per_token = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    w = t([2.0, 0.5])
    assert reduce(per_token, mask, Norm("token", 5, 2), w).item() == pytest.approx((2 * 3 + 0.5 * 15) / 5)
    assert reduce(per_token, mask, Norm("sample", 5, 2), w).item() == pytest.approx((2 * 1.5 + 0.5 * 5) / 2)
    assert reduce(per_token, mask, Norm("sample_sum", 5, 2), w).item() == pytest.approx((2 * 3 + 0.5 * 15) / 2)
    assert reduce(per_token, mask, Norm("token", 5, 2), torch.ones(2)).item() == pytest.approx(
        reduce(per_token, mask, Norm("token", 5, 2)).item())
