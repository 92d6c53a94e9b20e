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


# ------------------------------------------------------------------------------------------ RL (PPO family)
#
# Tensors are [B, T] over response tokens, with `mask` [B, T] (1 = a real response token). Rewards arrive
# per token (the KL penalty at every token, the scalar score at the last one).


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale masked values to unit variance (and zero mean unless `shift_mean` is False); padding stays 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016) over each response: the value after the
    last real token is 0 (the episode ends). Returns (advantages, returns = advantages + values)."""
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.size(1))):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * m  # padding after the end contributes nothing and resets nothing before it
        advantages[:, t] = running
        next_value = torch.where(m > 0, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al., 2024): each response's score minus the mean of its prompt's group, divided by the
    group's standard deviation when `scale`. `scores` [B] holds groups of `group_size` consecutive rows."""
    grouped = scores.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, keepdim=True, unbiased=False) + eps)
    return centered.reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al., 2024): each response's score minus the mean of the other responses to the same
    prompt, an unbiased baseline. Needs `group_size` >= 2."""
    if group_size < 2:
        raise ValueError("leave-one-out needs at least 2 samples per prompt")
    grouped = scores.float().view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimates from log-probs of sampled tokens (Schulman's k1/k2/k3):
    k1 = log r (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = (r' - 1) - log r' with r' = 1/r
    (unbiased, never negative); r = pi / ref."""
    log_ratio = logps.float() - ref_logps.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2 or k3")


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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over response tokens: 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_var(returns.float(), mask)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns.float() - values.float(), mask) / var_returns)


class AdaptiveKL:
    """The KL coefficient controller of Ziegler et al. (2019): move the coefficient toward the value that
    keeps the observed KL near `target`, by at most 20% of the error per `horizon` samples."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, observed_kl: float, samples: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, observed_kl / self.target - 1.0))
            self.coef *= 1.0 + error * samples / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.target, self.horizon = state["coef"], state["target"], state["horizon"]
