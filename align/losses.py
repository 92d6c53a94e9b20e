"""Training losses as pure tensor functions, so each can be checked against hand-computed values.

Reward model (pairwise ranking on scores r_c, r_r with margin m):
  bradley_terry  -log sigmoid(r_c - r_r - m)       (the margin version used by Llama 2's reward models)
  hinge          max(0, m - (r_c - r_r))           (the classic margin ranking loss)
  centering      coef * mean((r_c + r_r)^2)        keeps scores near zero (Eisenstein et al., 2023)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REWARD_LOSSES = ("bradley_terry", "hinge")


def reward_ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                        kind: str = "bradley_terry", center_coef: float = 0.0) -> torch.Tensor:
    """Mean pairwise loss over a batch of chosen/rejected scores (shape [B]); `margin` is a float or [B]."""
    gap = chosen.float() - rejected.float()
    if kind == "bradley_terry":
        loss = -F.logsigmoid(gap - margin)
    elif kind == "hinge":
        loss = torch.clamp(margin - gap, min=0.0)
    else:
        raise ValueError(f"unknown reward loss {kind!r}; expected one of {', '.join(REWARD_LOSSES)}")
    loss = loss.mean()
    if center_coef:
        loss = loss + center_coef * ((chosen.float() + rejected.float()) ** 2).mean()
    return loss


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs where chosen scores strictly higher; a tie counts half (neither right nor wrong)."""
    if chosen.numel() == 0:
        return float("nan")
    wins = (chosen > rejected).double().sum() + 0.5 * (chosen == rejected).double().sum()
    return float(wins) / chosen.numel()
