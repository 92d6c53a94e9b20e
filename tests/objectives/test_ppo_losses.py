"""The clipped policy and value losses, the registered policy losses (ppo, gspo, cispo), asymmetric clipping
and the loss aggregations, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from align.objectives.policy_losses import POLICY_LOSSES, PolicyLossSettings, policy_loss
from align.objectives.ppo_losses import ppo_policy_loss, ppo_value_loss
from align.objectives.stats import masked_mean


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


# ------------------------------------------------------------------------------------------ registered losses


def _today_clipped_surrogate(logps, old, advantages, mask, clip):
    """The policy loss as it was before the registry, kept here to pin the default to it bit for bit."""
    log_ratio = logps.float() - old.float()
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return (masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask),
            masked_mean(torch.expm1(-log_ratio) + log_ratio, mask))


def test_the_default_policy_loss_is_the_old_clipped_surrogate_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    logps = (-torch.rand(4, 6, generator=generator) * 3).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(4, 6, generator=generator)
    advantages, mask = torch.randn(4, 6, generator=generator), (torch.rand(4, 6, generator=generator) > 0.3).float()
    settings = PolicyLossSettings(max_new_tokens=6)  # what a stage without the new keys gives: ppo, 0.2, token_mean
    new = ppo_policy_loss(logps, old, advantages, mask, settings)
    new[0].backward()
    new_grad, logps.grad = logps.grad.clone(), None
    old_way = _today_clipped_surrogate(logps, old, advantages, mask, 0.2)
    old_way[0].backward()
    assert all(torch.equal(a, b) for a, b in zip(new, old_way)) and torch.equal(new_grad, logps.grad)


def test_asymmetric_clipping_moves_only_the_upper_bound():
    logps, old = torch.log(torch.tensor([[1.25, 0.75]])), torch.zeros(1, 2)
    advantages, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    higher = policy_loss(logps, old, advantages, mask, PolicyLossSettings(clip_low=0.2, clip_high=0.28))
    # bounds [0.8, 1.28]: r=1.25, A=+1 inside (-1.25); r=0.75, A=-1 below the floor: max(0.75, 0.8) = 0.8, clipped
    assert higher[0].item() == pytest.approx((-1.25 + 0.8) / 2, abs=1e-6) and higher[1].item() == pytest.approx(0.5)
    symmetric = policy_loss(logps, old, advantages, mask, PolicyLossSettings(clip_low=0.2, clip_high=0.2))
    # bounds [0.8, 1.2]: r=1.25 now clipped too: max(-1.25, -1.2) = -1.2
    assert symmetric[0].item() == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6) and symmetric[1].item() == 1.0


@pytest.mark.parametrize("aggregation, expected", [
    ("token_mean", -(1 + 2 + 3 + 4) / 4),             # every real token of the batch alike
    ("sequence_mean", (-(1 + 2 + 3) / 3 - 4 / 1) / 2),  # row means -2 and -4, then their mean
    ("constant", -(1 + 2 + 3 + 4) / (5 * 2)),          # the sum over max_new_tokens (5) x rows (2)
])
def test_each_aggregation_by_hand(aggregation, expected):
    """At ratio 1 each token's ppo loss is -A; padding (A = 9) counts nowhere."""
    advantages = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    settings = PolicyLossSettings(aggregation=aggregation, max_new_tokens=5)
    loss, _, _ = policy_loss(torch.zeros(2, 4), torch.zeros(2, 4), advantages, mask, settings)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_the_constant_aggregation_needs_max_new_tokens():
    with pytest.raises(ValueError, match="'constant' divides by max_new_tokens"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2),
                    PolicyLossSettings(aggregation="constant"))


def test_gspo_clips_whole_sequences_by_their_mean_log_ratio():
    """Row 0: token ratios 1.5 and 1, s = sqrt(1.5) = 1.2247 > 1.2: the whole sequence is clipped, its ratio-1
    token too. Row 1: ratios 1.5 and 1/1.5, s = 1: nothing clipped, though ppo clips its first token. The
    third column is padding (its log-probs would change s if counted); row 1's advantages average to 1."""
    logps = torch.log(torch.tensor([[1.5, 1.0, 50.0], [1.5, 1 / 1.5, 50.0]])).requires_grad_()
    old, mask = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    advantages = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    loss, clip_fraction, approx_kl = policy_loss(logps, old, advantages, mask, PolicyLossSettings(loss="gspo"))
    # token mean: row 0's tokens -A * 1.2 (clipped), row 1's -A * s = -1
    assert loss.item() == pytest.approx((2 * -1.2 + 2 * -1.0) / 4, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(0.5)
    k3 = lambda r: 1 / r - 1 + math.log(r)  # noqa: E731
    assert approx_kl.item() == pytest.approx((k3(1.5) + k3(1.0) + k3(1.5) + k3(1 / 1.5)) / 4, abs=1e-6)
    loss.backward()
    # d/dlogp of -A * s at each token of row 1 is -A * s = -1, over 4 tokens; row 0 is clipped: no gradient
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0, 0.0], [-0.25, -0.25, 0.0]]))
    logps.grad = None
    ppo, _, _ = policy_loss(logps, old, torch.ones(2, 3), mask, PolicyLossSettings(loss="ppo"))
    ppo.backward()
    # per token, with A = 1: ratio 1.5 is clipped (no gradient), the others are not (-r / 4)
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.25, 0.0], [0.0, -1 / 6, 0.0]]))


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """Weights clip(r, 0.8, 1.2) = 1.2, 1.0, 0.8 for ratios 1.5, 1.0, 0.5; loss -w * A * logp, token mean."""
    probs, ratios = torch.tensor([[0.6, 0.5, 0.2]]), torch.tensor([[1.5, 1.0, 0.5]])
    logps = torch.log(probs).requires_grad_()
    old = torch.log(probs / ratios)
    advantages, mask = torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3)
    loss, clip_fraction, _ = policy_loss(logps, old, advantages, mask, PolicyLossSettings(loss="cispo"))
    expected = (-1.2 * math.log(0.6) - 1.0 * math.log(0.5) + 0.8 * math.log(0.2)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(2 / 3)  # the first and last ratio fall outside [0.8, 1.2]
    loss.backward()
    # gradient -w * A / 3 at every token: the clipped ones keep theirs (ppo gives the first token none)
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.2 / 3, -1.0 / 3, 0.8 / 3]]))


def test_each_policy_loss_says_what_it_needs_and_an_unknown_one_is_named():
    needs = {name: (loss.sequence_level, loss.needs_groups) for name, loss in POLICY_LOSSES.items()}
    assert needs == {"ppo": (False, False), "gspo": (True, True), "cispo": (False, False)}
    with pytest.raises(ValueError, match="unknown policy loss 'dapo'; expected one of 'ppo', 'gspo' or 'cispo'"):
        PolicyLossSettings(loss="dapo")
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'"):
        PolicyLossSettings(aggregation="sum")
