"""Advantage estimators for the PPO family, one registered function each, with what each needs.

Why a registry: the trainer, the stage and the recipe schema used to test `estimator == "gae"` to decide
whether to build a critic, share prompts between a prompt's samples or skip prompts whose samples all
scored alike. Each estimator now says what it needs where it is defined (`register_advantage_estimator`):
`needs_critic` (values from a value head; it returns the critic's targets), `needs_groups` (it compares
the `samples_per_prompt` responses to each prompt, so those must stay together).
  gae   generalized advantage estimation on per-token rewards (Schulman et al., 2016), with a critic
  grpo  each response's reward minus its prompt's group mean, over the group's std (Shao et al., 2024)
  rloo  each response's reward minus the mean of the other responses to its prompt (Ahmadian et al., 2024)
  reinforce_pp  REINFORCE++ (Hu et al., 2025): each token's discounted return (the score at the last token,
        -coef * KL at each) normalised over the whole batch's tokens; no critic, no groups

Tensors are [B, T] over response tokens with `mask` [B, T] (1 = a real response token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from align.objectives.registry import Registry
from align.objectives.stats import whiten


@dataclass(frozen=True)
class AdvantageSettings:
    """What the estimators read (from the PPO stage: `estimator`, `gamma`, `lam`, `samples_per_prompt`,
    `group_scale`, `whiten_advantages`)."""

    estimator: str
    gamma: float         # GAE's discount
    lam: float           # GAE's lambda
    group_size: int      # responses sampled per prompt, consecutive rows
    group_scale: bool    # grpo divides by the group's std
    whiten: bool         # the trainer whitens the advantages afterwards

    def __post_init__(self):
        ADVANTAGE_ESTIMATORS[self.estimator]  # an unknown name fails here, not mid-run


@dataclass(frozen=True)
class AdvantageBatch:
    """One step's rollouts as the estimators see them. The reward of a response is its `scores` [B] less
    `kl_coef` * its per-token KL `kl` [B, T] (zeros, coefficient 0, when the penalty goes into the loss)."""

    scores: torch.Tensor
    kl: torch.Tensor
    kl_coef: float
    mask: torch.Tensor
    values: torch.Tensor | None = None  # the critic's, for estimators that need one

    def token_rewards(self) -> torch.Tensor:
        """-coef * KL at every token, the score added at the last one."""
        rewards = -self.kl_coef * self.kl
        rewards[torch.arange(len(self.scores)), last_positions(self.mask)] += self.scores
        return rewards

    def sequence_rewards(self) -> torch.Tensor:
        """The score less coef * the response's summed KL [B]."""
        return self.scores - self.kl_coef * self.kl.sum(dim=1)


Compute = Callable[[AdvantageBatch, AdvantageSettings], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator: `compute(batch, settings)` -> (advantages [B, T], returns [B, T] for the critic
    or None)."""

    name: str
    compute: Compute
    needs_critic: bool = False
    needs_groups: bool = False

    def __call__(self, batch: AdvantageBatch, settings: AdvantageSettings):
        return self.compute(batch, settings)


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def register_advantage_estimator(name: str, *, needs_critic: bool = False, needs_groups: bool = False):
    """Decorator: register `compute(batch, settings) -> (advantages, returns | None)` as estimator `name`."""
    return ADVANTAGE_ESTIMATORS.register(name, lambda compute: AdvantageEstimator(name, compute, needs_critic,
                                                                                  needs_groups))


def advantage_estimator(name: str) -> AdvantageEstimator:
    """The registered estimator `name` (ValueError naming the known ones otherwise)."""
    return ADVANTAGE_ESTIMATORS[name]


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last response token ([B, T] mask, contiguous response span)."""
    return (mask.long().cumsum(dim=1)).argmax(dim=1)


# ------------------------------------------------------------------------------------------ the estimators


@register_advantage_estimator("gae", needs_critic=True)
def generalized(batch: AdvantageBatch, settings: AdvantageSettings):
    return gae(batch.token_rewards(), batch.values, batch.mask, settings.gamma, settings.lam)


@register_advantage_estimator("grpo", needs_groups=True)
def group_normalized(batch: AdvantageBatch, settings: AdvantageSettings):
    per_sequence = group_advantages(batch.sequence_rewards(), settings.group_size, scale=settings.group_scale)
    return per_sequence[:, None] * batch.mask, None


@register_advantage_estimator("rloo", needs_groups=True)
def leave_one_out(batch: AdvantageBatch, settings: AdvantageSettings):
    return leave_one_out_advantages(batch.sequence_rewards(), settings.group_size)[:, None] * batch.mask, None


@register_advantage_estimator("reinforce_pp")
def reinforce_plus_plus(batch: AdvantageBatch, settings: AdvantageSettings):
    """Normalised over this process's rows; the trainer's pooled whitening (`whiten_advantages`) then makes
    it over every process's."""
    return whiten(reward_to_go(batch.token_rewards(), batch.mask, settings.gamma), batch.mask), None


# ------------------------------------------------------------------------------------------ the formulas


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Each response token's discounted sum of the rewards from it to the response's end: GAE with lambda 1
    and no critic (values 0)."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)[0]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each response: the value after the last real token is 0 (the
    episode ends). Returns (advantages, returns = advantages + values)."""
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
    """Each response's score minus the mean of its prompt's group, divided by the group's standard deviation
    when `scale`. `scores` [B] holds groups of `group_size` consecutive rows."""
    grouped = scores.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, keepdim=True, unbiased=False) + eps)
    return centered.reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each response's score minus the mean of the other responses to the same prompt, an unbiased
    baseline. Needs `group_size` >= 2."""
    if group_size < 2:
        raise ValueError("leave-one-out needs at least 2 samples per prompt")
    grouped = scores.float().view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)
