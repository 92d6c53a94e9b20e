"""Training losses as pure tensor functions, so each can be checked against hand-computed values.

Reward model (pairwise ranking on scores r_c, r_r with margin m):
  bradley_terry  -log sigmoid(r_c - r_r - m)       (the margin version used by Llama 2's reward models)
  hinge          max(0, m - (r_c - r_r))           (the classic margin ranking loss)
  centering      coef * mean((r_c + r_r)^2)        keeps scores near zero (Eisenstein et al., 2023)

Preference optimisation (log-probabilities of whole responses; h = (pi_c - ref_c) - (pi_r - ref_r)):
  sigmoid (DPO)  -log sigmoid(beta h)                                   Rafailov et al., 2023
  cdpo           (1 - e) * -log sigmoid(beta h) + e * -log sigmoid(-beta h)   labels flipped with prob. e
  ipo            (h - 1 / (2 beta))^2   (use per-token mean log-probs)   Azar et al., 2023
  hinge          max(0, 1 - beta h)                                     SLiC, Zhao et al., 2023
  simpo          -log sigmoid(beta (avg_c - avg_r) - gamma)   no reference, length-normalized; Meng et al., 2024
  orpo           nll_c - lambda log sigmoid(log odds_c - log odds_r)   no reference; Hong et al., 2024
The implicit reward of a response is beta * (pi - ref).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REWARD_LOSSES = ("bradley_terry", "hinge")
DPO_LOSSES = ("sigmoid", "cdpo", "ipo", "hinge")


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


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss over the batch, and the implicit rewards beta * (pi - ref) of chosen and rejected [B]."""
    chosen_reward = beta * (policy_chosen.float() - ref_chosen.float())
    rejected_reward = beta * (policy_rejected.float() - ref_rejected.float())
    h = (policy_chosen.float() - ref_chosen.float()) - (policy_rejected.float() - ref_rejected.float())
    if kind in ("sigmoid", "cdpo"):
        smoothing = label_smoothing if kind == "cdpo" else 0.0
        loss = -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        loss = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; expected one of {', '.join(DPO_LOSSES)}")
    return loss.mean(), chosen_reward.detach(), rejected_reward.detach()


def simpo_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Reference-free SimPO on per-token mean log-probs: -log sigmoid(beta (avg_c - avg_r) - gamma)."""
    logits = beta * (chosen_mean_logp.float() - rejected_mean_logp.float()) - gamma
    return (-(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)).mean()


def orpo_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, chosen_nll: torch.Tensor,
              lam: float) -> torch.Tensor:
    """Reference-free ORPO: the chosen NLL plus lambda times the odds-ratio term on per-token mean log-probs.
    log odds(p) = log p - log(1 - p), with p = exp(mean log-prob)."""
    c, r = chosen_mean_logp.float(), rejected_mean_logp.float()
    log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    return (chosen_nll.float() - lam * F.logsigmoid(log_odds)).mean()
