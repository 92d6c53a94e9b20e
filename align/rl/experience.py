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
    # On-policy (`old_logps` None): the policy's log-probs from the update's own pass, before its optimizer
    # step, for the sampler mismatch figure (`align.rl.logprob_mismatch`).
    update_logps: torch.Tensor | None = None

    def record_update_logps(self, index: list[int], width: int, logps: torch.Tensor) -> None:
        """Keep the rows `index` (first `width` positions) of the update pass's log-probs."""
        if self.update_logps is None:
            self.update_logps = torch.zeros_like(self.mask)
        self.update_logps[index, :width] = logps.detach().float().cpu()

    @property
    def policy_logps(self) -> torch.Tensor | None:
        """[B, T] the trained policy's log-probs of the sampled tokens before this step's update."""
        return self.old_logps if self.old_logps is not None else self.update_logps


def informative_rows(scores: torch.Tensor, k: int) -> list[int]:
    """Rows of the prompts whose k rewards are not all equal. Under grpo/rloo a uniform group's advantages
    are all zero: with the KL in the loss such rows teach the policy nothing but the KL term, so skipping
    them saves their scoring and training passes (DAPO's dynamic sampling, without the resampling)."""
    groups = scores.view(-1, k)
    varied = (groups.max(dim=1).values - groups.min(dim=1).values) > 1e-6
    return [g * k + j for g in varied.nonzero().flatten().tolist() for j in range(k)]
