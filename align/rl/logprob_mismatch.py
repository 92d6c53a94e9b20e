"""How far the rollout sampler's log-probs are from the trained policy's on the same tokens, every PPO step.

Why: rollouts decode from a sampling copy (the adapter folded in, bf16 where the hardware has it, a KV
cache), while the PPO ratio's old log-probs come from the trained policy's teacher-forced pass (fp32 master
weights under the stage's autocast, fp32 head). PPO assumes both are the same distribution; a broken copy
(an adapter not folded in, weights out of sync) or too coarse a precision makes the responses come from
another policy than the one trained, and nothing else in the step's figures shows it.

What is compared, per response token: the sampler's log softmax(logits / T) of the token it drew
(`align.rl.sampler.sampled_logps`) against the policy's log softmax(logits / T) of that token (`old_logps`,
or on-policy the update pass's own, taken before its optimizer step), both at the loop's temperature (1 for
greedy) and before top-k/top-p. `logprob_mismatch_mean` and `logprob_mismatch_max` are the mean and the
largest absolute difference in nats over the trained response tokens of every process. Rollouts sampled by
`generate` (settings only transformers implements) keep no log-probs: the figures are absent then.
"""

from __future__ import annotations

import logging

import torch

from align.errors import TrainingError
from align.models.generation import library_only_settings
from align.rl.experience import Experience
from align.runtime import distributed

log = logging.getLogger(__name__)


def warn_if_unmeasured(generation, limit: float | None) -> None:
    """Say so when the limit can never trip: settings only `generate` implements (penalties, min_new_tokens)
    make it sample the rollouts, and it keeps no log-probs."""
    only_generate = library_only_settings(generation)
    if limit is not None and only_generate:
        log.warning("max_logprob_mismatch is set, but generation.%s makes rollouts come from transformers' "
                    "generate, which keeps no log-probs: the mismatch is not measured", only_generate[0])


def mismatch_figures(exp: Experience) -> dict:
    """`logprob_mismatch_mean` and `logprob_mismatch_max` over every process's trained response tokens that
    the sampler kept a log-prob for ({} when there are none)."""
    sampler, policy = exp.rollouts.sampler_logps, exp.policy_logps
    part = torch.zeros(1, 3, dtype=torch.float64)  # this process's [sum, count, max]
    if sampler is not None and policy is not None and len(exp.rollouts):
        known = exp.mask.bool() & sampler.isfinite()
        difference = torch.where(known, (sampler - policy).abs(), torch.zeros_like(policy)).double()
        part[0] = torch.stack([difference.sum(), known.sum().double(), difference.max()])
    pooled = distributed.gather_cat(part)  # one row per process (this one's alone)
    total, count, largest = pooled[:, 0].sum(), pooled[:, 1].sum(), pooled[:, 2].max()
    if float(count) == 0.0:
        return {}
    return {"logprob_mismatch_mean": float(total / count), "logprob_mismatch_max": float(largest)}


def stop_if_mismatched(figures: dict, limit: float | None, step: int) -> None:
    """Raise when the step's largest mismatch is over `limit` (the stage's `max_logprob_mismatch`); `step`
    counts from 0, as `PPOTrainer.step`'s does (the history and checkpoints count from 1)."""
    largest = figures.get("logprob_mismatch_max")
    if limit is None or largest is None or largest <= limit:
        return
    raise TrainingError(
        f"PPO step {step + 1}: logprob_mismatch_max is {largest:.4g} nats (mean {figures['logprob_mismatch_mean']:.4g}), "
        f"over max_logprob_mismatch {limit:g}: the rollouts were sampled from a distribution other than the policy "
        "being trained. Stopping before this step's checkpoint; nothing is registered. Check the sampling "
        "precision (mixed_precision: no, or ALIGN_BF16_INFERENCE=0, samples in fp32) or raise max_logprob_mismatch.")
