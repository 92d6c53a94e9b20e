"""Length-based changes to a step's rewards, before any advantage is computed.

Why here: the PPO loop's rewards come from the reward mix (`align.rewards.mix`), which knows the texts, not how
the sampler ended them; these two shapings read the rollouts' lengths and ends, so they sit beside the loop.
  missing_eos_penalty  subtracted from a response cut at max_new_tokens
  overlong             DAPO's soft overlong punishment (Yu et al., 2025): a response in the last `buffer`
                       tokens before max_new_tokens loses `penalty` * (how far into the buffer it ran) / buffer
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from align.rl.rollout import Rollouts
    from align.rl.settings import PPOSettings


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """[B] penalty of responses of `lengths` tokens: 0 up to max_new_tokens - buffer, then rising linearly to
    `penalty` at max_new_tokens (and staying there beyond)."""
    into_buffer = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0.0) / buffer
    return penalty * into_buffer.clamp(max=1.0)


def shaped_scores(scores: torch.Tensor, rollouts: Rollouts, settings: PPOSettings) -> torch.Tensor:
    """The step's scores [B] less the configured length penalties (unchanged when none is set)."""
    if settings.missing_eos_penalty:
        scores = scores - abs(settings.missing_eos_penalty) * (~rollouts.ended).float()
    if settings.overlong is not None:
        scores = scores - overlong_penalty(rollouts.response_lengths, settings.generation.max_new_tokens,
                                           settings.overlong.buffer, settings.overlong.penalty)
    return scores
