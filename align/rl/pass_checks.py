"""Checks that the PPO trainer's shared passes compute what its plain passes compute.

Two shortcuts save most of a step's scoring on a CPU: the frozen bottom blocks run once per row for the policy
and the reference (a shared frozen prefix), and rows sampled from one prompt run that prompt once (shared
prompts). Each is checked once against the plain per-row pass on the first rollouts; a model whose forward
does something else with its input falls back to the plain pass, with a warning."""

from __future__ import annotations

import logging

import torch

from align.models.logprobs import prefix_hidden
from align.rl.rollout import Rollouts, trimmed

log = logging.getLogger(__name__)
GAP_LIMIT = 0.02  # nats a token: how far a shared pass may drift from the plain one (bf16 noise is ~0.005)


class SharedPassChecks:
    """Methods of `PPOTrainer` (see the module docstring); they use its attributes."""

    @torch.no_grad()
    def _prefixes(self, rollouts: Rollouts) -> list[torch.Tensor] | None:
        """Per row, the hidden states leaving the frozen blocks (unpadded), or None when not shared."""
        if not self.split:
            return None
        out = []
        for start in range(0, len(rollouts), self.settings.batch_size):
            index = list(range(start, min(start + self.settings.batch_size, len(rollouts))))
            ids, mask, _, _ = trimmed(rollouts, index)
            with self._autocast():
                hidden = prefix_hidden(self.model, ids.to(self.device), mask.to(self.device), self.split)
            out += [hidden[row, : int(mask[row].sum())].cpu() for row in range(len(index))]
        if not self._split_checked:
            self._check_split(rollouts, out)
        return out if self.split else None

    def _gap_to_plain(self, rollouts: Rollouts, index: list[int], **variant) -> float:
        """Mean log-prob difference per response token (nats, rows `index`) between the reference's pass with
        `variant` (a shared frozen prefix, or shared prompts) and its plain per-row pass. The mean, not the
        largest: in bf16 the two passes' different matmul shapes move a rare token's log-prob by up to ~0.2
        nats, while a pass that is wrong (positions, cache) is off by nats on every token."""
        mask = rollouts.mask[index]
        with torch.no_grad(), self.reference_model() as reference:
            fast, t = self._forward(reference, rollouts, index, **variant)
            plain, _ = self._forward(reference, rollouts, index, group=1)
        weights = mask[:, :t].to(self.device).float()
        gaps = (fast["logps"] - plain["logps"]).abs() * weights
        log.debug("shared pass vs plain: largest gap %.3g nats", float(gaps.max()))
        return float(gaps.sum() / weights.sum().clamp(min=1.0))

    def _check_split(self, rollouts: Rollouts, prefixes: list[torch.Tensor]) -> None:
        """The shared-prefix path must give the plain path's log-probs; if a model's forward does anything
        else with its input (scaling, extra embeddings), fall back to the plain path."""
        self._split_checked = True
        gap = self._gap_to_plain(rollouts, list(range(min(4, len(rollouts)))), prefixes=prefixes)
        log.info("shared frozen-block pass: %.3g nats a token from the plain pass", gap)
        if gap > GAP_LIMIT:
            log.warning("shared frozen-block pass differs from the plain pass by %.3g nats a token; using the plain "
                        "pass", gap)
            self.split = 0

    def _check_grouping(self, rollouts: Rollouts) -> None:
        """The shared-prompt pass must give the per-row pass's log-probs (a model whose cache does something
        else falls back to the per-row pass, with a warning)."""
        self._group_checked = True
        gap = self._gap_to_plain(rollouts, list(range(min(2 * self.group, len(rollouts)))))
        log.info("shared-prompt pass: %.3g nats a token from the per-row pass", gap)
        if gap > GAP_LIMIT:
            log.warning("shared-prompt pass differs from the per-row pass by %.3g nats a token; using the per-row "
                        "pass", gap)
            self.group = 1
