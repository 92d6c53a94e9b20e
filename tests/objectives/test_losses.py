"""Pure loss functions against hand-computed values: reward ranking losses and the DPO family."""

from __future__ import annotations

import math

import pytest
import torch

from align.objectives.losses import dpo_loss, orpo_loss, pairwise_accuracy, reward_ranking_loss, simpo_loss

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


# ------------------------------------------------------------------------------------------ RL


def test_gae_by_hand_and_padding_changes_nothing():
    from align.objectives.losses import gae

    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=2: 1 - 0.4 = 0.6; t=1: (0 + 0.4 - 0.2) + 0.5 * 0.6 = 0.5; t=0: (0 + 0.2 - 0.5) + 0.5 * 0.5 = -0.05
    assert advantages.tolist()[0] == pytest.approx([-0.05, 0.5, 0.6, 0.0], abs=1e-6)
    assert returns.tolist()[0] == pytest.approx([0.45, 0.7, 1.0, 0.0], abs=1e-6)
    discounted, _ = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    assert discounted.tolist()[0] == pytest.approx([0.9, 1.0], abs=1e-6)


def test_group_and_leave_one_out_advantages():
    from align.objectives.losses import group_advantages, leave_one_out_advantages

    grouped = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    assert grouped.tolist() == pytest.approx([1, -1, -1, 1, 0, 0, 0, 0], abs=1e-4)  # a solved group teaches nothing
    unscaled = group_advantages(torch.tensor([3.0, 1.0]), group_size=2, scale=False)
    assert unscaled.tolist() == pytest.approx([1.0, -1.0])
    loo = leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3)
    assert loo.tolist() == pytest.approx([1.0, -0.5, -0.5])
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(torch.tensor([1.0]), group_size=1)


def test_clipped_policy_loss_by_hand():
    from align.objectives.losses import ppo_policy_loss

    logps = torch.tensor([[math.log(1.5), math.log(1.5), 0.0]])
    old = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, -1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clip_fraction, approx_kl = ppo_policy_loss(logps, old, advantages, mask, clip=0.2)
    # A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped); A=-1: max(1.5, 1.2) = 1.5 (not clipped); third is padding
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(1 / 1.5 - 1 + math.log(1.5), abs=1e-6)


def test_clipped_value_loss_by_hand():
    from align.objectives.losses import ppo_value_loss

    values, old, returns = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 2.0]])
    loss, clipped = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # row 1: max((1-0)^2, (0.7-0)^2) = 1; row 2: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped branch)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.69) / 2, abs=1e-6)
    assert clipped.item() == pytest.approx(0.5)


def test_kl_estimators_whitening_explained_variance_and_controller():
    from align.objectives.losses import AdaptiveKL, explained_variance, kl_per_token, whiten

    logps, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_per_token(logps, ref, "k1").item() == pytest.approx(1.0)
    assert kl_per_token(logps, ref, "k2").item() == pytest.approx(0.5)
    assert kl_per_token(logps, ref, "k3").item() == pytest.approx(math.exp(-1) - 1 + 1, abs=1e-6)
    assert kl_per_token(ref, ref, "k3").item() == 0.0
    white = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert white.tolist()[0] == pytest.approx([-1.224745, 0.0, 1.224745, 0.0], abs=1e-5)
    returns, mask = torch.tensor([[1.0, 2.0, 4.0]]), torch.ones(1, 3)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 7 / 3), returns, mask) == pytest.approx(0.0, abs=1e-6)
    controller = AdaptiveKL(coef=0.1, target=0.1, horizon=100)
    assert controller.update(observed_kl=0.5, samples=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    assert AdaptiveKL(coef=0.1, target=None, horizon=100).update(5.0, 10) == 0.1  # fixed coefficient
