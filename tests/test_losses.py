"""Pure loss functions against hand-computed values: reward ranking losses and the DPO family."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses import dpo_loss, orpo_loss, pairwise_accuracy, reward_ranking_loss, simpo_loss

CHOSEN = torch.tensor([1.0, 0.0])
REJECTED = torch.tensor([0.0, 0.5])


def _nls(x: float) -> float:
    """-log sigmoid(x), by hand."""
    return math.log(1 + math.exp(-x))


def test_bradley_terry_without_margin():
    expected = (_nls(1.0) + _nls(-0.5)) / 2  # 0.31326 and 0.97408
    assert reward_ranking_loss(CHOSEN, REJECTED).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.643672, abs=1e-5)


def test_bradley_terry_with_constant_and_per_pair_margin():
    constant = reward_ranking_loss(CHOSEN, REJECTED, 0.5)
    assert constant.item() == pytest.approx((_nls(0.5) + _nls(-1.0)) / 2, abs=1e-6)
    per_pair = reward_ranking_loss(CHOSEN, REJECTED, torch.tensor([0.0, 1.0]))
    assert per_pair.item() == pytest.approx((_nls(1.0) + _nls(-1.5)) / 2, abs=1e-6)


def test_hinge_margin_ranking():
    # gaps are 1.0 and -0.5; with m = 1: max(0, 1 - 1) = 0 and max(0, 1 + 0.5) = 1.5
    assert reward_ranking_loss(CHOSEN, REJECTED, 1.0, kind="hinge").item() == pytest.approx(0.75)
    # a pair already past its margin contributes nothing
    assert reward_ranking_loss(torch.tensor([3.0]), torch.tensor([0.0]), 1.0, kind="hinge").item() == 0.0


def test_centering_adds_the_mean_squared_sum():
    plain = reward_ranking_loss(CHOSEN, REJECTED)
    centered = reward_ranking_loss(CHOSEN, REJECTED, center_coef=0.1)
    # 0.1 * mean((1 + 0)^2, (0 + 0.5)^2) = 0.1 * 0.625
    assert (centered - plain).item() == pytest.approx(0.0625, abs=1e-6)


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    reward_ranking_loss(chosen, rejected).backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown reward loss 'squared'"):
        reward_ranking_loss(CHOSEN, REJECTED, kind="squared")


def test_accuracy_and_its_mirror():
    chosen = torch.tensor([1.0, 2.0, 0.0, 5.0, 1.0])
    rejected = torch.tensor([0.0, 3.0, 0.0, 1.0, -1.0])  # right, wrong, tie, right, right
    acc = pairwise_accuracy(chosen, rejected)
    assert acc == pytest.approx((3 + 0.5) / 5)
    assert pairwise_accuracy(rejected, chosen) == pytest.approx(1 - acc)


# ------------------------------------------------------------------------------------------ DPO family

# Two pairs. h = (pi_c - ref_c) - (pi_r - ref_r): pair 0: (-1 - -2) - (-3 - -2) = 2; pair 1: (-2 - -2) - (-2 - -1) = 1
PI_C, PI_R = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0])
REF_C, REF_R = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -1.0])


def test_dpo_sigmoid_loss_and_implicit_rewards():
    loss, chosen, rejected = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5)
    assert loss.item() == pytest.approx((_nls(1.0) + _nls(0.5)) / 2, abs=1e-6)  # beta * h = 1.0 and 0.5
    assert chosen.tolist() == pytest.approx([0.5, 0.0])
    assert rejected.tolist() == pytest.approx([-0.5, -0.5])


def test_conservative_dpo_flips_labels_with_the_smoothing_probability():
    loss, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, kind="cdpo", label_smoothing=0.1)
    expected = [0.9 * _nls(x) + 0.1 * _nls(-x) for x in (1.0, 0.5)]
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)


def test_ipo_and_hinge():
    ipo, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, kind="ipo")
    assert ipo.item() == pytest.approx(((2 - 1) ** 2 + (1 - 1) ** 2) / 2)  # target h = 1 / (2 beta) = 1
    hinge, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, kind="hinge")
    assert hinge.item() == pytest.approx((0.0 + 0.5) / 2)  # max(0, 1 - 1.0), max(0, 1 - 0.5)


def test_dpo_starts_at_log2_with_zero_rewards_when_policy_equals_reference():
    loss, chosen, rejected = dpo_loss(REF_C, REF_R, REF_C, REF_R, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert chosen.abs().max().item() == 0 and rejected.abs().max().item() == 0


def test_simpo_is_reference_free_and_length_normalized():
    loss = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(_nls(2.0 * 1.0 - 0.5), abs=1e-6)


def test_orpo_odds_ratio_by_hand():
    c, r = math.log(0.5), math.log(0.25)  # odds 1 and 1/3: log odds ratio = log 3
    loss = orpo_loss(torch.tensor([c]), torch.tensor([r]), torch.tensor([0.7]), lam=0.1)
    assert loss.item() == pytest.approx(0.7 + 0.1 * _nls(math.log(3)), abs=1e-6)


def test_unknown_dpo_loss_is_refused():
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, kind="kto")
