"""The clipped policy and value losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from align.objectives.ppo_losses import ppo_policy_loss, ppo_value_loss


def test_clipped_policy_loss_by_hand():
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
    values, old, returns = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 2.0]])
    loss, clipped = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # row 1: max((1-0)^2, (0.7-0)^2) = 1; row 2: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped branch)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.69) / 2, abs=1e-6)
    assert clipped.item() == pytest.approx(0.5)
