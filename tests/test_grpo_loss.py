"""The clipped GRPO loss, its normalisation over the whole batch, KL, truncated IS and health metrics.

Sequences here are [B, L] rows; position 0 is a prompt token (mask 0), the rest model tokens.
"""

import math

import pytest
import torch

from grpo.loss import LossConfig, policy_loss

LN = math.log


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def loss_of(logp, old, gen, adv, mask, cfg, **kw):
    tokens = int(mask.sum())
    seqs = int((mask.sum(-1) > 0).sum())
    return policy_loss(logp, old, gen, adv, mask, cfg, batch_tokens=tokens, batch_sequences=seqs, **kw)


def test_clipping_on_both_sides():
    # four one-token sequences, rho = exp(logp - old):
    #  A=+1 rho=1.5 -> max(-1.5, -1.28) = -1.28 (clipped high)
    #  A=-1 rho=0.5 -> max( 0.5,  0.8 ) =  0.8  (clipped low)
    #  A=+1 rho=0.5 -> max(-0.5, -0.8 ) = -0.5
    #  A=-1 rho=1.5 -> max( 1.5,  1.28) =  1.5
    old = t([[0.0, -1.0]] * 4)
    logp = (old + t([[0.0, LN(1.5)], [0.0, LN(0.5)], [0.0, LN(0.5)], [0.0, LN(1.5)]])).requires_grad_()
    adv = t([1.0, -1.0, 1.0, -1.0])
    mask = t([[0, 1]] * 4)
    loss, m = loss_of(logp, old, old, adv, mask, LossConfig(clip_low=0.2, clip_high=0.28))
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 0.5 + 1.5) / 4)
    assert (m["clip_high"], m["clip_low"], m["tokens"]) == (1.0, 1.0, 4.0)
    loss.backward()
    # clipped tokens get no gradient; the others d(-A*rho)/dlogp = -A*rho, over 4 tokens
    assert logp.grad[:, 1].tolist() == pytest.approx([0.0, 0.0, -0.5 / 4, 1.5 / 4])
    assert logp.grad[:, 0].tolist() == [0.0] * 4


def test_token_and_sequence_normalisation_differ():
    # on-policy (rho = 1): per-token loss is -A. seq0: 1 token, A=2. seq1: 3 tokens, A=1.
    logp = t([[0.0, -1.0, 0.0, 0.0], [0.0, -1.0, -2.0, -3.0]])
    mask = t([[0, 1, 0, 0], [0, 1, 1, 1]])
    adv = t([2.0, 1.0])
    token, _ = loss_of(logp, logp, logp, adv, mask, LossConfig(normalization="token"))
    seq, _ = loss_of(logp, logp, logp, adv, mask, LossConfig(normalization="sequence"))
    assert token.item() == pytest.approx((-2 - 3) / 4)  # -1.25
    assert seq.item() == pytest.approx((-2 / 1 + -3 / 3) / 2)  # -1.5


def test_truncated_is_weight_is_capped_and_carries_no_gradient():
    # weights exp(old - gen): 3 (capped to 2) and 0.5; rho = 1, A = 1 -> per token -w
    old = t([[0.0, -1.0, -1.0]])
    gen = old - t([[0.0, LN(3.0), LN(0.5)]])
    logp = old.clone().requires_grad_()
    mask = t([[0, 1, 1]])
    loss, m = loss_of(logp, old, gen, t([1.0]), mask, LossConfig(tis_cap=2.0))
    assert loss.item() == pytest.approx((-2.0 - 0.5) / 2)
    assert m["tis_capped"] == 1.0
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, -2.0 / 2, -0.5 / 2])


def test_k3_kl_to_the_reference():
    # ref - logp = ln 2: k3 = 2 - ln 2 - 1; its gradient wrt logp is 1 - exp(ref - logp) = -1
    logp = t([[0.0, -2.0]]).requires_grad_()
    ref = t([[0.0, -2.0 + LN(2.0)]])
    mask = t([[0, 1]])
    cfg = LossConfig(kl_beta=0.1)
    loss, m = loss_of(logp, logp.detach(), logp.detach(), t([0.0]), mask, cfg, ref_logprobs=ref)
    assert loss.item() == pytest.approx(0.1 * (1 - LN(2.0)))
    assert m["kl"] == pytest.approx(1 - LN(2.0))
    loss.backward()
    assert logp.grad[0, 1].item() == pytest.approx(-0.1)
    with pytest.raises(ValueError):
        loss_of(logp, logp, logp, t([0.0]), mask, cfg)


def test_health_metrics_compare_engine_and_trainer_logprobs():
    # token 1: gen - train = ln 2; token 2: equal. token 3 is a prompt token and does not count.
    train = t([[0.0, -2.0, -1.0, -5.0]])
    gen = t([[0.0, -2.0 + LN(2.0), -1.0, 0.0]])
    mask = t([[0, 1, 1, 0]])
    _, m = loss_of(train, train, gen, t([1.0]), mask, LossConfig(), entropy=t([[9.0, 0.5, 0.25, 9.0]]))
    assert m["token_mult_prob_error"] / m["tokens"] == pytest.approx((2.0 + 1.0) / 2)
    # k3 on log(train/gen) = -ln 2: 0.5 + ln 2 - 1
    assert m["gen_kl_error"] == pytest.approx(0.5 + LN(2.0) - 1.0)
    assert m["entropy"] == pytest.approx(0.75)


def test_micro_batches_sum_to_the_full_batch_loss_and_gradient():
    g = torch.Generator().manual_seed(0)
    b, l = 4, 7
    logp = -torch.rand(b, l, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(b, l, generator=g, dtype=torch.float64) * 0.3
    gen = old + torch.randn(b, l, generator=g, dtype=torch.float64) * 0.3
    ref = old + torch.randn(b, l, generator=g, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    mask = torch.zeros(b, l, dtype=torch.float64)
    for i, n in enumerate([6, 2, 4, 1]):  # different model-token counts per sequence
        mask[i, 1 : 1 + n] = 1
    tokens, seqs = int(mask.sum()), b
    for normalization in ("token", "sequence"):
        cfg = LossConfig(normalization=normalization, kl_beta=0.05, tis_cap=1.5)
        full_x = logp.clone().requires_grad_()
        full, _ = policy_loss(full_x, old, gen, adv, mask, cfg, batch_tokens=tokens, batch_sequences=seqs, ref_logprobs=ref)
        full.backward()
        acc_x = logp.clone().requires_grad_()
        acc = 0.0
        for sl in (slice(0, 1), slice(1, 4)):
            part, _ = policy_loss(
                acc_x[sl], old[sl], gen[sl], adv[sl], mask[sl], cfg,
                batch_tokens=tokens, batch_sequences=seqs, ref_logprobs=ref[sl],
            )
            part.backward()
            acc = acc + part.item()
        assert acc == pytest.approx(full.item(), rel=1e-12, abs=1e-12)
        torch.testing.assert_close(acc_x.grad, full_x.grad, rtol=1e-12, atol=1e-12)


def test_extreme_values_outside_the_mask_do_not_poison_the_loss():
    # fp32, as in training: exp(200) overflows; prompt positions must not turn it into nan
    logp = torch.tensor([[-200.0, -1.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1.0]])
    gen = torch.tensor([[-300.0, -1.0]])
    ref = torch.tensor([[0.0, -1.0]])
    cfg = LossConfig(kl_beta=0.1, tis_cap=2.0)
    loss, m = loss_of(logp, old, gen, torch.tensor([1.0]), torch.tensor([[0.0, 1.0]]), cfg, ref_logprobs=ref)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert torch.isfinite(logp.grad).all()
    assert m["token_mult_prob_error"] == 1.0


def test_kl_log_ratio_and_per_token_kl_are_clamped():
    # policy logp 0, reference -30: log(ref/policy) = -30 -> clamped to -20 -> k3 = e^-20 + 19 -> capped at 10
    logp = t([[0.0, 0.0, 0.0]]).requires_grad_()
    ref = t([[0.0, -30.0, -1.0]])
    mask = t([[0, 1, 1]])
    loss, m = loss_of(logp, logp, logp, t([0.0]), mask, LossConfig(kl_beta=1.0), ref_logprobs=ref)
    small = math.exp(-1.0) + 1.0 - 1.0          # k3(-1) = e^-1, untouched by either clamp
    assert m["kl"] == pytest.approx(10.0 + small)
    assert loss.item() == pytest.approx((10.0 + small) / 2)
    unclamped, m2 = loss_of(logp, logp, logp, t([0.0]), mask,
                            LossConfig(kl_beta=1.0, kl_log_ratio_clamp=None, kl_max=None), ref_logprobs=ref)
    assert m2["kl"] == pytest.approx(math.exp(-30.0) + 29.0 + small)


# ---- loss variants --------------------------------------------------------------------------

def test_dual_clip_caps_the_loss_of_a_negative_advantage_at_c():
    # A=-1: rho=5 -> max(5, 1.28) = 5, capped at c=3 (no gradient); rho=2 -> 2 < 3, kept
    old = t([[0.0, -1.0]] * 2)
    logp = (old + t([[0.0, LN(5.0)], [0.0, LN(2.0)]])).requires_grad_()
    loss, m = loss_of(logp, old, old, t([-1.0, -1.0]), t([[0, 1]] * 2), LossConfig(ratio_clip_c=3.0))
    assert loss.item() == pytest.approx((3.0 + 2.0) / 2)
    assert m["clip_dual"] == 1.0
    loss.backward()
    assert logp.grad[:, 1].tolist() == pytest.approx([0.0, 2.0 / 2])   # d(-A rho)/dlogp = rho, over 2 tokens


def test_gspo_clips_the_geometric_mean_ratio_of_each_sequence():
    # seq 0: token ratios 1.5 and 0.5 -> s = sqrt(0.75) = 0.8660 (inside [0.8, 1.28]); A = +1 -> -0.8660
    # seq 1: token ratios 1.5 and 1.5 -> s = 1.5 -> clipped to 1.28; A = +1 -> -1.28, no gradient
    old = t([[0.0, -1.0, -1.0]] * 2)
    logp = (old + t([[0.0, LN(1.5), LN(0.5)], [0.0, LN(1.5), LN(1.5)]])).requires_grad_()
    loss, m = loss_of(logp, old, old, t([1.0, 1.0]), t([[0, 1, 1]] * 2), LossConfig(kind="gspo"))
    s0 = math.sqrt(0.75)
    assert loss.item() == pytest.approx((-s0 - 1.28) / 2)
    assert (m["clip_high"], m["clip_low"]) == (2.0, 0.0)   # both tokens of the clipped sequence
    loss.backward()
    # d(-A s)/dlogp_t = -A s / n_tokens, over 2 sequences
    assert logp.grad[0, 1:].tolist() == pytest.approx([-s0 / 2 / 2] * 2)
    assert logp.grad[1, 1:].tolist() == pytest.approx([0.0, 0.0])


def test_cispo_weights_the_log_likelihood_by_the_clipped_ratio_without_dropping_gradients():
    # token 0: rho = 1.5 -> weight 1.28, A = +1, logp = -1 -> -1.28 * 1 * -1 = 1.28
    # token 1: rho = 0.5 -> weight 0.8, A = -1, logp = -2 -> -0.8 * -1 * -2 = -1.6
    old = t([[0.0, -1.0 - LN(1.5)], [0.0, -2.0 - LN(0.5)]])
    logp = t([[0.0, -1.0], [0.0, -2.0]]).requires_grad_()
    loss, m = loss_of(logp, old, old, t([1.0, -1.0]), t([[0, 1]] * 2), LossConfig(kind="cispo"))
    assert loss.item() == pytest.approx((1.28 - 1.6) / 2)
    assert (m["clip_high"], m["clip_low"]) == (1.0, 1.0)
    loss.backward()
    # gradient -A * weight: clipped tokens keep theirs (PPO's clip would zero the first)
    assert logp.grad[:, 1].tolist() == pytest.approx([-1.28 / 2, 0.8 / 2])


def test_dr_grpo_divides_by_a_constant_not_by_lengths():
    # on-policy, per-token -A: seq 0 one token A=2, seq 1 three tokens A=1 -> sum -5;
    # 2 sequences x constant 4 -> -5 / 8
    logp = t([[0.0, -1.0, 0.0, 0.0], [0.0, -1.0, -2.0, -3.0]])
    mask = t([[0, 1, 0, 0], [0, 1, 1, 1]])
    loss, _ = loss_of(logp, logp, logp, t([2.0, 1.0]), mask, LossConfig(kind="dr_grpo", constant_normalizer=4))
    assert loss.item() == pytest.approx(-5 / 8)


def test_unknown_loss_kind_and_a_dual_clip_below_one_are_refused():
    with pytest.raises(ValueError, match="loss kind"):
        LossConfig(kind="ppo")
    with pytest.raises(ValueError, match="ratio_clip_c must be > 1"):
        LossConfig(ratio_clip_c=0.9)
