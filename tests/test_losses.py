"""Loss functions against values worked out by hand (math.log / math.exp), not by the code
under test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from defenses.ga import ga_loss
from defenses.npo import npo_loss
from defenses.npo_muse import npo_muse_loss
from defenses.retain import gdr_loss, klr_loss


def log_sigmoid(x: float) -> float:
    return -math.log(1.0 + math.exp(-x))


def test_npo_loss_matches_hand_computed_values():
    # Two examples, β = 0.1: log-ratios +2 and −4.
    policy = torch.tensor([-10.0, -15.0])
    ref = torch.tensor([-12.0, -11.0])
    beta = 0.1
    expected = -(2 / beta) * (log_sigmoid(-0.1 * 2.0) + log_sigmoid(-0.1 * -4.0)) / 2
    # = 20 · (log(1 + e^{0.2}) + log(1 + e^{-0.4})) / 2
    assert expected == pytest.approx(10 * (math.log(1 + math.exp(0.2)) + math.log(1 + math.exp(-0.4))))
    assert npo_loss(policy, ref, beta).item() == pytest.approx(expected, rel=1e-6)


def test_npo_loss_second_hand_value_other_beta():
    # One example, β = 0.5, log-ratio −3: L = −4 · log σ(1.5) = 4 · log(1 + e^{−1.5}).
    value = npo_loss(torch.tensor([-20.0]), torch.tensor([-17.0]), 0.5).item()
    assert value == pytest.approx(4 * math.log(1 + math.exp(-1.5)), rel=1e-6)


def test_npo_loss_at_reference_is_two_over_beta_log_two():
    logps = torch.tensor([-3.0, -40.0, -7.5])
    for beta in (0.1, 1.0, 2.5):
        assert npo_loss(logps, logps.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_loss_keeps_float64_inputs_in_float64():
    # Long-sequence log-likelihoods near -1e3 whose differences live in the 6th decimal:
    # float32 keeps ~7 significant digits, so it would lose them.
    policy = [-1234.5678912345, -987.6543210987, -2048.0000001234]
    ref = [-1234.5678901234, -987.6543298765, -2047.9999987654]
    beta = 0.1
    # Independent float64 formula: L = (2/β) · mean log(1 + exp(β · (logπ_θ − logπ_ref))).
    expected = 2 / beta * sum(math.log1p(math.exp(beta * (p - r))) for p, r in zip(policy, ref)) / 3
    value = npo_loss(torch.tensor(policy, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), beta)
    assert value.dtype == torch.float64
    assert abs(value.item() - expected) < 1e-12
    as_float32 = npo_loss(torch.tensor(policy), torch.tensor(ref), beta)
    assert as_float32.dtype == torch.float32
    assert abs(as_float32.item() - expected) > 1e-7  # the precision float64 keeps and float32 does not


def test_npo_loss_computes_bfloat16_inputs_in_float32():
    policy = torch.tensor([-10.0, -15.0], dtype=torch.bfloat16)
    ref = torch.tensor([-12.0, -11.0], dtype=torch.bfloat16)
    value = npo_loss(policy, ref, 0.1)
    assert value.dtype == torch.float32
    expected = 20 * (math.log1p(math.exp(0.2)) + math.log1p(math.exp(-0.4))) / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_npo_gradient_is_ga_gradient_reweighted():
    # dL/d logπ_θ(x_i) = (2/B) · σ(β · (logπ_θ − logπ_ref)) for each example i.
    policy = torch.tensor([-10.0, -15.0, -9.0], requires_grad=True)
    ref = torch.tensor([-12.0, -11.0, -9.0])
    beta = 0.3
    npo_loss(policy, ref, beta).backward()
    ratios = [2.0, -4.0, 0.0]
    expected = [2 / 3 * (1 / (1 + math.exp(-beta * r))) for r in ratios]
    assert policy.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_npo_gradient_tends_to_ga_gradient_as_beta_goes_to_zero():
    policy = torch.tensor([-10.0, -25.0], requires_grad=True)
    ref = torch.tensor([-12.0, -11.0])
    npo_loss(policy, ref, 1e-6).backward()
    npo_grad = policy.grad.clone()
    policy.grad = None
    ga_loss(policy).backward()
    assert torch.allclose(npo_grad, policy.grad, atol=1e-5)
    assert policy.grad.tolist() == [0.5, 0.5]


def test_npo_loss_is_finite_for_huge_ratios():
    value = npo_loss(torch.tensor([0.0, -1e6]), torch.tensor([-1e6, 0.0]), 0.1)
    assert math.isfinite(value.item())


def test_npo_loss_rejects_non_positive_beta():
    with pytest.raises(ValueError, match="beta"):
        npo_loss(torch.zeros(1), torch.zeros(1), 0.0)


def test_ga_loss_is_mean_sequence_log_likelihood():
    assert ga_loss(torch.tensor([-3.0, -5.0, -10.0])).item() == pytest.approx(-6.0)


def test_npo_muse_loss_matches_hand_value_and_muse_expression():
    # B=1, T=2, V=2 raw logits.
    policy = torch.tensor([[[1.0, 2.0], [0.5, -1.0]]])
    ref = torch.tensor([[[1.5, 1.0], [0.5, 0.0]]])
    beta = 0.1
    diffs = [0.5, -1.0, 0.0, 1.0]  # ref − policy, entry by entry
    expected = -(2 / beta) * sum(log_sigmoid(beta * d) for d in diffs) / 4
    assert npo_muse_loss(policy, ref, beta).item() == pytest.approx(expected, rel=1e-6)
    # The MUSE trainer's own expression on an unpadded batch.
    muse = -F.logsigmoid(beta * (ref - policy)).mean() * 2 / beta
    assert npo_muse_loss(policy, ref, beta, torch.ones(1, 2)).item() == pytest.approx(muse.item(), rel=1e-6)


def test_npo_muse_loss_leaves_padding_out():
    policy = torch.tensor([[[1.0, 2.0], [9.0, -9.0]]])
    ref = torch.tensor([[[1.5, 1.0], [0.0, 0.0]]])
    beta = 0.1
    expected = -(2 / beta) * (log_sigmoid(beta * 0.5) + log_sigmoid(beta * -1.0)) / 2
    mask = torch.tensor([[1, 0]])
    assert npo_muse_loss(policy, ref, beta, mask).item() == pytest.approx(expected, rel=1e-6)


def test_npo_muse_differs_from_paper_npo_under_a_logit_shift():
    # Adding a constant to every logit leaves log-probabilities (so paper NPO) unchanged but
    # moves the MUSE variant: it is not the same loss.
    policy = torch.tensor([[[1.0, 2.0, 0.0]]])
    ref = policy.clone()
    shifted = policy + 3.0
    assert npo_muse_loss(shifted, ref, 0.1).item() != pytest.approx(npo_muse_loss(policy, ref, 0.1).item())


def test_gdr_loss_is_masked_mean_nll():
    token_log_probs = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert gdr_loss(token_log_probs, mask).item() == pytest.approx((1 + 2 + 3) / 3)


def test_klr_loss_matches_hand_computed_kl():
    # One position with a real target (T=2 -> one next-token position), V=2.
    ref_logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])  # p_ref = (1/4, 3/4)
    policy_logits = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]])  # p_θ = (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    mask = torch.tensor([[1]])
    assert klr_loss(policy_logits, ref_logits, mask).item() == pytest.approx(expected, rel=1e-6)


def test_klr_loss_zero_at_reference_and_shift_invariant():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 4)
    assert klr_loss(logits, logits.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert klr_loss(logits + 4.0, logits, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert klr_loss(logits.flip(-1), logits, mask).item() > 0


def test_klr_loss_leaves_padding_out():
    logits = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(1))
    ref = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(2))
    full = klr_loss(logits, ref, torch.tensor([[1, 0]]))
    first = klr_loss(logits[:, :2], ref[:, :2], torch.tensor([[1]]))
    assert full.item() == pytest.approx(first.item(), rel=1e-6)
