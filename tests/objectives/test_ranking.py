"""The reward model's ranking losses and accuracy against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from align.objectives.ranking import RANKING_LOSSES, pairwise_accuracy, reward_ranking_loss

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


def test_unknown_loss_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="unknown reward loss 'squared'; expected one of 'bradley_terry' or 'hinge'"):
        reward_ranking_loss(CHOSEN, REJECTED, kind="squared")


def test_the_recipe_accepts_exactly_the_registered_reward_losses():
    from align.config.stages import RewardStage

    assert RANKING_LOSSES.names() == ["bradley_terry", "hinge"]  # centering is a term added to either
    assert RewardStage(data="d.jsonl", loss="hinge").loss == "hinge"
    with pytest.raises(ValueError, match="'bradley_terry' or 'hinge'"):
        RewardStage(data="d.jsonl", loss="centering")


def test_accuracy_and_its_mirror():
    chosen = torch.tensor([1.0, 2.0, 0.0, 5.0, 1.0])
    rejected = torch.tensor([0.0, 3.0, 0.0, 1.0, -1.0])  # right, wrong, tie, right, right
    acc = pairwise_accuracy(chosen, rejected)
    assert acc == pytest.approx((3 + 0.5) / 5)
    assert pairwise_accuracy(rejected, chosen) == pytest.approx(1 - acc)
