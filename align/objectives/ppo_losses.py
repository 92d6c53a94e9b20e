"""The PPO family's clipped losses for the policy and the critic (Schulman et al., 2017).

One form each (no variants to choose between, so no registry). Tensors are [B, T] over response tokens,
with `mask` [B, T] (1 = a real response token); means are over the masked tokens.
"""

from __future__ import annotations

import torch

from align.objectives.stats import masked_mean


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate: mean over response tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps)), with
    r = exp(logp - old_logp). Returns (loss, share of tokens where the clipped branch was taken, approx KL
    old -> new, k3)."""
    log_ratio = logps.float() - old_logps.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(torch.expm1(-log_ratio) + log_ratio, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


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
