"""One PPO step's experience: the sampled rollouts with their rewards, the log-probs, values and advantages
the update trains on, and which rows of a group are informative."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.rl.rollout import Rollouts


@dataclass
class Experience:
    rollouts: Rollouts
    mask: torch.Tensor          # [B, T] float, 1 on response tokens
    old_logps: torch.Tensor | None  # [B, T] policy log-probs when sampled (None: on-policy, taken in the update)
    ref_logps: torch.Tensor     # [B, T] reference log-probs
    entropy: torch.Tensor | None    # [B, T] policy entropy at each response position
    values: torch.Tensor | None
    scores: torch.Tensor        # [B] the reward after the EOS penalty, normalization and clipping
    per_source: dict[str, torch.Tensor]
    advantages: torch.Tensor    # [B, T]
    returns: torch.Tensor | None
    # Everything sampled this step, for the figures; `rollouts` and `scores` above are the rows trained on
    # (fewer when uniform groups are skipped).
    sampled: Rollouts
    sampled_scores: torch.Tensor
    prefixes: list[torch.Tensor] | None = None  # per row [L_i, H]: output of the frozen blocks, when shared


def informative_rows(scores: torch.Tensor, k: int) -> list[int]:
    """Rows of the prompts whose k rewards are not all equal. Under grpo/rloo a uniform group's advantages
    are all zero: with the KL in the loss such rows teach the policy nothing but the KL term, so skipping
    them saves their scoring and training passes (DAPO's dynamic sampling, without the resampling)."""
    groups = scores.view(-1, k)
    varied = (groups.max(dim=1).values - groups.min(dim=1).values) > 1e-6
    return [g * k + j for g in varied.nonzero().flatten().tolist() for j in range(k)]
