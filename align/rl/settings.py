"""What the PPO trainer reads of a PPO stage's config, as one frozen object.

Why: `align.rl.ppo.PPOTrainer` used to take the whole stage config (data sources, reward sources, LoRA
shape, held-out split ...) and read some 25 of its fields. `PPOSettings` holds only those, named, with the
objectives' own settings grouped as the objectives define them (`AdvantageSettings`, `KLPenalty`,
`PolicyLossSettings`), so what the loop depends on is visible in one place and a trainer can be built
without a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from align.objectives.advantages import AdvantageEstimator, AdvantageSettings, advantage_estimator
from align.objectives.kl import KLPenalty
from align.objectives.policy_losses import (LOSS_AGGREGATIONS, POLICY_LOSSES, LossAggregation, PolicyLoss,
                                           PolicyLossSettings)

if TYPE_CHECKING:
    from align.config.schema import GenerationSettings
    from align.config.stages import OverlongShaping, PPOStage


@dataclass(frozen=True)
class PPOSettings:
    """Everything `PPOTrainer` reads; build it with `from_stage`."""

    # sampling
    rollout_batch: int                 # responses per step (this process's share under several)
    samples_per_prompt: int
    generation: GenerationSettings     # how responses are sampled (temperature: the log-probs' too)
    missing_eos_penalty: float | None  # subtracted from a response cut at max_new_tokens
    overlong: OverlongShaping | None   # DAPO's soft length penalty near max_new_tokens
    skip_uniform_groups: bool          # grouped estimators, KL in the loss: skip prompts scored alike
    # objectives
    advantage: AdvantageSettings
    kl: KLPenalty
    clip: float                        # the policy ratio's clip range
    policy: PolicyLossSettings         # which policy loss, its clip bounds (clip_low/high) and aggregation
    value_clip: float
    vf_coef: float                     # the value loss's weight
    # optimisation
    lr: float
    weight_decay: float
    scheduler: str
    warmup_ratio: float
    max_grad_norm: float
    ppo_epochs: int
    minibatch: int                     # responses per optimizer step
    batch_size: int                    # rows per forward pass
    seed: int
    # the model
    method: str                        # full, lora or qlora: only lora samples from a merged copy
    freeze_layers: int                 # frozen bottom blocks, whose pass policy and reference can share
    # health
    max_logprob_mismatch: float | None = None  # stop when the sampler's log-probs differ more (nats, per token)

    @classmethod
    def from_stage(cls, cfg: PPOStage) -> "PPOSettings":
        """The settings of a PPO stage's config (`align.config.stages.PPOStage`, after
        `align.stages.ppo.per_process_config` under several processes)."""
        return cls(
            rollout_batch=cfg.rollout_batch, samples_per_prompt=cfg.samples_per_prompt, generation=cfg.generation,
            missing_eos_penalty=cfg.missing_eos_penalty, overlong=cfg.overlong,
            skip_uniform_groups=cfg.skip_uniform_groups,
            advantage=AdvantageSettings(estimator=cfg.estimator, gamma=cfg.gamma, lam=cfg.lam,
                                        group_size=cfg.samples_per_prompt, group_scale=cfg.group_scale,
                                        whiten=cfg.whiten_advantages),
            kl=KLPenalty.from_recipe(cfg.kl), clip=cfg.clip, value_clip=cfg.value_clip, vf_coef=cfg.vf_coef,
            policy=PolicyLossSettings(loss=cfg.policy_loss,
                                      clip_low=cfg.clip if cfg.clip_low is None else cfg.clip_low,
                                      clip_high=cfg.clip if cfg.clip_high is None else cfg.clip_high,
                                      aggregation=cfg.loss_aggregation, max_new_tokens=cfg.generation.max_new_tokens),
            lr=cfg.lr, weight_decay=cfg.weight_decay, scheduler=cfg.scheduler, warmup_ratio=cfg.warmup_ratio,
            max_grad_norm=cfg.max_grad_norm, ppo_epochs=cfg.ppo_epochs, minibatch=cfg.minibatch,
            batch_size=cfg.batch_size, seed=cfg.seed, method=cfg.method, freeze_layers=cfg.freeze_layers,
            max_logprob_mismatch=cfg.max_logprob_mismatch)

    @property
    def estimator(self) -> AdvantageEstimator:
        return advantage_estimator(self.advantage.estimator)

    @property
    def policy_loss(self) -> PolicyLoss:
        return POLICY_LOSSES[self.policy.loss]

    @property
    def loss_aggregation(self) -> LossAggregation:
        return LOSS_AGGREGATIONS[self.policy.aggregation]
