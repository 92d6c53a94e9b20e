"""The PPO family's clipped losses for the policy and the critic (Schulman et al., 2017).

The policy loss is the one the settings name among the registered ones (`align.objectives.policy_losses`:
ppo, gspo, cispo, and how their per-token losses are aggregated); given a plain clip range it is the classic
clipped surrogate. The value loss has one form. Tensors are [B, T] over response tokens, with `mask` [B, T]
(1 = a real response token); means are over the masked tokens.
"""

from __future__ import annotations

import torch

from align.objectives.policy_losses import PolicyLossSettings, policy_loss
from align.objectives.stats import masked_mean


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float | PolicyLossSettings = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy loss of `clip`'s settings (a number: the clipped surrogate, mean over response tokens of
    max(-A r, -A clip(r, 1 - clip, 1 + clip)), r = exp(logp - old_logp)). Returns (loss, share of tokens where
    the clip bound acted, approx KL old -> new, k3)."""
    settings = clip if isinstance(clip, PolicyLossSettings) else PolicyLossSettings(clip_low=clip, clip_high=clip)
    return policy_loss(logps, old_logps, advantages, mask, settings)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss: 0.5 * mean over tokens of max((v - R)^2, (old_v + clip(v - old_v) - R)^2).
    Returns (loss, share of tokens where clipping set the loss)."""
    values, returns = values.float(), returns.float()
    clipped_values = old_values.float() + torch.clamp(values - old_values.float(), -clip, clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()
