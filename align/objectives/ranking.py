"""Reward-model objectives: pairwise ranking losses on the scores of chosen and rejected responses.

Why a registry: the recipe's `loss` names are the names registered here (`RANKING_LOSSES`), so a new
ranking loss is one decorated function. With scores r_c, r_r and margin m:
  bradley_terry  -log sigmoid(r_c - r_r - m)       (the margin version used by Llama 2's reward models)
  hinge          max(0, m - (r_c - r_r))           (the classic margin ranking loss)
and, added to either with `center_coef`, centering: coef * mean((r_c + r_r)^2), which keeps scores near
zero (Eisenstein et al., 2023).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from align.objectives.registry import Registry

RankingLoss = Callable[[torch.Tensor, "torch.Tensor | float"], torch.Tensor]  # (gap r_c - r_r, margin) -> [B]

RANKING_LOSSES: Registry[RankingLoss] = Registry("reward loss")


def register_ranking_loss(name: str):
    """Decorator: register `loss(gap, margin) -> per-pair loss [B]` as the reward loss `name`."""
    return RANKING_LOSSES.register(name)


@register_ranking_loss("bradley_terry")
def bradley_terry(gap: torch.Tensor, margin: torch.Tensor | float) -> torch.Tensor:
    return -F.logsigmoid(gap - margin)


@register_ranking_loss("hinge")
def hinge(gap: torch.Tensor, margin: torch.Tensor | float) -> torch.Tensor:
    return torch.clamp(margin - gap, min=0.0)


def centering(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """mean((r_c + r_r)^2): zero when the pair's scores are centred on 0."""
    return ((chosen.float() + rejected.float()) ** 2).mean()


def reward_ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                        kind: str = "bradley_terry", center_coef: float = 0.0) -> torch.Tensor:
    """Mean pairwise loss `kind` over a batch of chosen/rejected scores (shape [B]), plus `center_coef` times
    the centering term; `margin` is a float or [B]."""
    loss = RANKING_LOSSES[kind](chosen.float() - rejected.float(), margin).mean()
    if center_coef:
        loss = loss + center_coef * centering(chosen, rejected)
    return loss


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs where chosen scores strictly higher; a tie counts half (neither right nor wrong)."""
    if chosen.numel() == 0:
        return float("nan")
    wins = (chosen > rejected).double().sum() + 0.5 * (chosen == rejected).double().sum()
    return float(wins) / chosen.numel()
