"""The PPO family's policy losses, one registered function each, and how their per-token losses are averaged.

Why a registry: GRPO's successors change two separate things, the per-token loss (how the importance ratio
is formed and clipped) and the aggregation (how the per-token losses become one number). Each is chosen by
name in the recipe (`policy_loss`, `loss_aggregation`) and every loss is aggregated the same way, so any
loss can be combined with any aggregation. The losses (`POLICY_LOSSES`):
  ppo    the clipped surrogate max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = exp(logp - old_logp)
         per token (Schulman et al., 2017; asymmetric "clip-higher" from DAPO, Yu et al., 2025)
  gspo   the same clipped surrogate on the sequence's ratio s = exp(mean over its tokens of log r) and the
         sequence's advantage, so a sequence is clipped as a whole (Zheng et al., 2025, GSPO-token form:
         each token carries the value s and the gradient s * grad log pi)
  cispo  -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp: the clipped ratio is only a weight, so every
         token keeps its gradient, the clipped ones too (MiniMax-M1, 2025)
The aggregations (`LOSS_AGGREGATIONS`):
  token_mean     mean over every response token of the batch (DAPO; the PPO default)
  sequence_mean  mean over each sequence's tokens, then over the sequences (the original GRPO)
  constant       sum over the tokens / (max_new_tokens * rows) (Dr. GRPO: no length bias)

Tensors are [B, T] over response tokens with `mask` [B, T] (1 = a real response token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from align.objectives.registry import Registry
from align.objectives.stats import masked_mean


@dataclass(frozen=True)
class PolicyLossSettings:
    """What the policy losses read (from the PPO stage: `policy_loss`, `clip_low`, `clip_high` (each `clip`
    unless set), `loss_aggregation`, `generation.max_new_tokens`)."""

    loss: str = "ppo"
    clip_low: float = 0.2          # the ratio's floor is 1 - clip_low
    clip_high: float = 0.2         # its ceiling 1 + clip_high
    aggregation: str = "token_mean"
    max_new_tokens: int | None = None  # the `constant` aggregation's length

    def __post_init__(self):
        POLICY_LOSSES[self.loss], LOSS_AGGREGATIONS[self.aggregation]  # an unknown name fails here, not mid-run


# ------------------------------------------------------------------------------------------ aggregations

Reduce = Callable[[torch.Tensor, torch.Tensor, PolicyLossSettings], torch.Tensor]


@dataclass(frozen=True)
class LossAggregation:
    """`reduce(per_token, mask, settings)` -> the loss of a batch. `per_row`: the result is a mean over rows,
    so batches (micro-batches of one minibatch) are weighted by their rows, not their tokens."""

    name: str
    reduce: Reduce
    per_row: bool

    def weight(self, mask: torch.Tensor) -> torch.Tensor:
        """How much a batch with `mask` counts among the batches of one optimizer step."""
        return torch.tensor(float(mask.size(0))) if self.per_row else mask.sum()


LOSS_AGGREGATIONS: Registry[LossAggregation] = Registry("loss aggregation")


def register_loss_aggregation(name: str, *, per_row: bool):
    """Decorator: register `reduce(per_token, mask, settings) -> loss` as the loss aggregation `name`."""
    return LOSS_AGGREGATIONS.register(name, lambda reduce: LossAggregation(name, reduce, per_row))


@register_loss_aggregation("token_mean", per_row=False)
def token_mean(per_token: torch.Tensor, mask: torch.Tensor, settings: PolicyLossSettings) -> torch.Tensor:
    return masked_mean(per_token, mask)


@register_loss_aggregation("sequence_mean", per_row=True)
def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, settings: PolicyLossSettings) -> torch.Tensor:
    """A row without response tokens counts as a loss of 0."""
    mask = mask.to(per_token.dtype)
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()


@register_loss_aggregation("constant", per_row=True)
def constant(per_token: torch.Tensor, mask: torch.Tensor, settings: PolicyLossSettings) -> torch.Tensor:
    if not settings.max_new_tokens:
        raise ValueError("loss aggregation 'constant' divides by max_new_tokens; none was given")
    return (per_token * mask.to(per_token.dtype)).sum() / (settings.max_new_tokens * mask.size(0))


# ------------------------------------------------------------------------------------------ losses

PerToken = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossSettings],
                    tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss: `per_token(logps, old_logps, advantages, mask, settings)` -> (per-token losses,
    where the clip bound acted) [B, T]. Called, it aggregates them: (loss, clip fraction, approx KL old -> new,
    k3), the two figures over the masked tokens. `sequence_level`: the ratio, clip and advantage are the
    sequence's (a row's per-token advantages are averaged); `needs_groups`: made for k >= 2 samples a prompt."""

    name: str
    per_token: PerToken
    sequence_level: bool = False
    needs_groups: bool = False

    def __call__(self, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 settings: PolicyLossSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        losses, clipped = self.per_token(logps, old_logps, advantages, mask, settings)
        loss = LOSS_AGGREGATIONS[settings.aggregation].reduce(losses, mask, settings)
        log_ratio = logps.float() - old_logps.float()
        approx_kl = masked_mean(torch.expm1(-log_ratio) + log_ratio, mask)
        return loss, masked_mean(clipped.float(), mask).detach(), approx_kl.detach()


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def register_policy_loss(name: str, *, sequence_level: bool = False, needs_groups: bool = False):
    """Decorator: register `per_token(logps, old_logps, advantages, mask, settings) -> (losses, clipped)`."""
    return POLICY_LOSSES.register(name, lambda per_token: PolicyLoss(name, per_token, sequence_level, needs_groups))


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, settings: PolicyLossSettings):
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - settings.clip_low, 1.0 + settings.clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


@register_policy_loss("ppo")
def clipped_surrogate(logps, old_logps, advantages, mask, settings):
    return _clipped_surrogate(torch.exp(logps.float() - old_logps.float()), advantages, settings)


@register_policy_loss("gspo", sequence_level=True, needs_groups=True)
def sequence_ratio(logps, old_logps, advantages, mask, settings):
    logps, mask = logps.float(), mask.float()
    tokens = mask.sum(dim=1).clamp(min=1.0)
    sequence_log_ratio = ((logps - old_logps.float()) * mask).sum(dim=1) / tokens
    sequence_advantage = (advantages.float() * mask).sum(dim=1) / tokens
    # value: the sequence's ratio s at each of its tokens; gradient: s * grad log pi(token)
    ratio = torch.exp(logps - logps.detach() + sequence_log_ratio.detach()[:, None])
    return _clipped_surrogate(ratio, sequence_advantage[:, None], settings)


@register_policy_loss("cispo")
def clipped_weight(logps, old_logps, advantages, mask, settings):
    logps = logps.float()
    ratio = torch.exp(logps - old_logps.float()).detach()
    low, high = 1.0 - settings.clip_low, 1.0 + settings.clip_high
    weight = torch.clamp(ratio, low, high)
    return -weight * advantages * logps, (ratio < low) | (ratio > high)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                settings: PolicyLossSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss `settings.loss`, aggregated by `settings.aggregation`: (loss, clip fraction, approx KL)."""
    return POLICY_LOSSES[settings.loss](logps, old_logps, advantages, mask, settings)
