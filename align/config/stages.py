"""The shipped stage kinds' configs: SFT, reward, DPO and PPO, one typed class each.

A stage kind names its config class as `config_type` (`align.stages`); the recipe's `stages` accept every
registered kind's config, so a new kind may define its config beside its `Stage` instead of here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_serializer, model_validator

from align.config.schema import (
    DataSpec,
    Gate,
    GenerationSettings,
    KLSettings,
    PreferenceData,
    RewardSource,
    StageBase,
    Strict,
    TrainerPasses,
    raise_conflicts,
)
from align.objectives.registry import registered_name


class SFTStage(StageBase, TrainerPasses):
    kind: Literal["sft"] = "sft"
    data: DataSpec
    eval_data: DataSpec | None = None
    eval_split: float = Field(0.1, ge=0, lt=1)
    assistant_only_loss: bool = True
    # Each batch's `batch_size` conversations packed several to a row of at most `max_length` tokens, position
    # ids restarting per conversation so none attends to another (`align.data.packing`); batches then come in
    # seeded random order instead of grouped by length. Same steps and the same loss as unpacked.
    packing: bool = False
    on_bad_rows: Literal["drop", "error"] = "error"
    max_dropped_share: float = Field(0.1, ge=0, le=1)


class RewardStage(StageBase, PreferenceData):
    """`loss` (a name registered in `align.objectives.ranking`): bradley_terry = -logsigmoid(r_c - r_r - m);
    hinge = max(0, m - (r_c - r_r)). The margin m is `margin`, or per pair the row field named by
    `margin_field`. `center_coef` penalizes mean((r_c + r_r)^2)."""

    kind: Literal["reward"] = "reward"
    loss: Annotated[str, registered_name("align.objectives.ranking.RANKING_LOSSES")] = "bradley_terry"
    margin: float = 0.0
    center_coef: float = Field(0.0, ge=0)
    # last: score read at the last token (the usual); mean: mean of the response tokens' final hidden states
    pooling: Literal["last", "mean"] = "last"
    gate: Gate = Gate()


class DPOStage(StageBase, PreferenceData):
    """`loss` (a name registered in `align.objectives.preference`): sigmoid (DPO), cdpo (DPO with
    `label_smoothing` = share of flipped labels), ipo, hinge, and the reference-free simpo (`beta`, target
    margin `simpo_gamma`) and orpo (weight `orpo_lambda`).

    `reference` (reference-based losses): `precomputed` log-probs from one pass before training (no model
    kept; the cheapest), `adapter_disabled` (LoRA/QLoRA: the same weights with the adapter switched off),
    `copy` (a frozen second copy), `frozen_prefix` (LoRA/QLoRA with `freeze_layers`: each step runs the
    frozen bottom blocks once for both and the top blocks with the adapter switched off; no pass before
    training), or `auto`: frozen_prefix where it costs less than precomputed (`align.stages.dpo.chosen_reference`),
    else precomputed."""

    kind: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    loss: Annotated[str, registered_name("align.objectives.preference.PREFERENCE_LOSSES")] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    simpo_gamma: float = Field(0.5, ge=0)
    orpo_lambda: float = Field(0.1, gt=0)
    # Adds rpo_alpha * the chosen responses' per-token NLL (RPO, Pang et al. 2024): keeps DPO from lowering
    # the likelihood of the preferred answers along with the rejected ones (which can cost EOS and format).
    rpo_alpha: float = Field(0.0, ge=0)
    reference: Literal["auto", "adapter_disabled", "copy", "precomputed", "frozen_prefix"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> "DPOStage":
        from align.objectives.preference import PREFERENCE_LOSSES  # what each loss needs, said where it is defined

        conflicts = []
        loss = PREFERENCE_LOSSES[self.loss]
        conflicts += [f"loss {self.loss} needs {key} > 0 ({why})" for key, why in loss.requires.items()
                      if not getattr(self, key)]
        if self.label_smoothing and "label_smoothing" not in loss.reads:
            smoothed = [name for name, other in PREFERENCE_LOSSES.items() if "label_smoothing" in other.reads]
            conflicts.append(f"label_smoothing applies to the {' and '.join(smoothed)} losses, not {self.loss}")
        if loss.reference_free and self.reference not in ("auto",):
            conflicts.append(f"loss {self.loss} is reference-free; remove reference: {self.reference}")
        conflicts += reference_conflicts(self)
        raise_conflicts(conflicts)
        return self


def reference_conflicts(cfg) -> list[str]:
    """What a DPO or KTO stage's `reference` needs of its method and frozen blocks."""
    conflicts = []
    if cfg.reference in ("adapter_disabled", "frozen_prefix") and cfg.method == "full":
        conflicts.append(f"reference {cfg.reference} needs method lora or qlora (full fine-tuning has no "
                         "adapter to switch off); use precomputed or copy")
    if cfg.reference == "frozen_prefix" and not cfg.freeze_layers:
        conflicts.append("reference frozen_prefix needs freeze_layers > 0 (the frozen bottom blocks are what "
                         "the policy and the reference share)")
    return conflicts


# PPO keys added after run folders were first written, with the default at which the dump leaves them out
ADDED_KEY_DEFAULTS = {"max_logprob_mismatch": None, "policy_loss": "ppo", "loss_aggregation": "token_mean",
                      "clip_low": None, "clip_high": None, "overlong": None}


class OverlongShaping(Strict):
    """DAPO's soft overlong punishment (`align.rl.reward_shaping`): a response in the last `buffer` tokens
    before `generation.max_new_tokens` loses up to `penalty` of its reward, linearly with its length."""

    buffer: int = Field(..., gt=0)
    penalty: float = Field(1.0, ge=0)


class PPOStage(StageBase):
    """RL against reward models, checkers, or a weighted mix (`rewards`), our own PPO (`align.rl.ppo`).

    Each step samples `rollout_batch` responses (`samples_per_prompt` per prompt), scores them, and makes
    `ppo_epochs` passes in minibatches of `minibatch` responses (micro-batches of `batch_size`). `estimator`:
    gae (a critic and GAE with `gamma`, `lam`; `value`: head = a value head on the policy trunk, adapter =
    a value head on a second LoRA adapter of the same base), grpo (group-normalized advantages over
    the k samples of a prompt) or rloo (leave-one-out baseline). `missing_eos_penalty` is subtracted from the
    reward of a response cut at `generation.max_new_tokens`. `skip_uniform_groups` (grpo/rloo with the KL in
    the loss): a prompt whose k responses all got the same reward has zero advantage, so its rows skip the
    scoring and training passes (DAPO's dynamic sampling, without resampling). `eval_split` of the prompts (at most
    `eval_limit`) are held out; the stage reports their reward before and after training."""

    kind: Literal["ppo"] = "ppo"
    prompts: DataSpec
    eval_prompts: DataSpec | None = None
    eval_split: float = Field(0.05, ge=0, lt=1)
    eval_limit: int = Field(64, gt=0)
    rewards: list[RewardSource] = Field(..., min_length=1)
    estimator: Annotated[str, registered_name("align.objectives.advantages.ADVANTAGE_ESTIMATORS")] = "gae"
    value: Literal["head", "adapter"] = "head"
    vf_coef: float = Field(0.1, ge=0)
    kl: KLSettings = KLSettings()
    generation: GenerationSettings = GenerationSettings(temperature=1.0)
    samples_per_prompt: int = Field(1, gt=0)
    rollout_batch: int = Field(16, gt=0)
    ppo_epochs: int = Field(2, gt=0)
    minibatch: int = Field(8, gt=0)
    clip: float = Field(0.2, gt=0)
    # The policy loss (a name registered in `align.objectives.policy_losses`): ppo (the clipped surrogate),
    # gspo (the sequence's ratio, clipped per sequence), cispo (the clipped ratio as a weight on log pi).
    policy_loss: Annotated[str, registered_name("align.objectives.policy_losses.POLICY_LOSSES")] = "ppo"
    # token_mean (DAPO) | sequence_mean (GRPO) | constant (Dr. GRPO: sum / (max_new_tokens * rows))
    loss_aggregation: Annotated[str, registered_name("align.objectives.policy_losses.LOSS_AGGREGATIONS")] = \
        "token_mean"
    # The ratio's bounds 1 - clip_low and 1 + clip_high (DAPO's clip-higher); None: `clip`.
    clip_low: float | None = None
    clip_high: float | None = None
    overlong: OverlongShaping | None = None
    value_clip: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    group_scale: bool = True
    skip_uniform_groups: bool = True
    reward_normalize: bool = False
    reward_clip: float | None = Field(None, gt=0)
    missing_eos_penalty: float | None = Field(None, ge=0)
    allow_failed_gate: bool = False
    # Stop the run at the step where the sampler's log-prob of a token it drew differs from the trained
    # policy's by more than this many nats (that step's `logprob_mismatch_max`, `align.rl.logprob_mismatch`);
    # None: the mismatch is only logged.
    max_logprob_mismatch: float | None = Field(None, gt=0)

    @model_serializer(mode="wrap")
    def _dump_without_keys_at_their_defaults(self, handler):
        """Keys added since run folders were first written are left out of the dump while at their defaults
        (`ADDED_KEY_DEFAULTS`): a stage config written before they existed hashes the same, so its run folder
        still resumes."""
        dump = handler(self)
        for key, default in ADDED_KEY_DEFAULTS.items():
            if getattr(self, key) == default:
                dump.pop(key, None)
        return dump

    @model_validator(mode="after")
    def _consistent(self) -> "PPOStage":
        from align.objectives.advantages import ADVANTAGE_ESTIMATORS  # what each estimator needs
        from align.objectives.policy_losses import POLICY_LOSSES  # what each policy loss needs

        conflicts = []
        if self.rollout_batch % self.samples_per_prompt:
            conflicts.append(f"rollout_batch ({self.rollout_batch}) must be a multiple of samples_per_prompt "
                             f"({self.samples_per_prompt})")
        if ADVANTAGE_ESTIMATORS[self.estimator].needs_groups and self.samples_per_prompt < 2:
            conflicts.append(f"estimator {self.estimator} compares the samples of a prompt: set "
                             "samples_per_prompt >= 2")
        if POLICY_LOSSES[self.policy_loss].needs_groups and self.samples_per_prompt < 2:
            conflicts.append(f"policy_loss {self.policy_loss} is made for several samples of a prompt: set "
                             "samples_per_prompt >= 2")
        conflicts += [f"{key} must be > 0, got {getattr(self, key)}" for key in ("clip_low", "clip_high")
                      if getattr(self, key) is not None and getattr(self, key) <= 0]
        if self.overlong and self.overlong.buffer > self.generation.max_new_tokens:
            conflicts.append(f"overlong.buffer ({self.overlong.buffer}) must be at most generation.max_new_tokens "
                             f"({self.generation.max_new_tokens})")
        if self.value == "adapter" and self.method == "full":
            conflicts.append("value: adapter puts the critic on a second LoRA adapter; it needs method lora or "
                             "qlora (use value: head with full fine-tuning)")
        if self.minibatch > self.rollout_batch:
            conflicts.append(f"minibatch ({self.minibatch}) is larger than rollout_batch ({self.rollout_batch})")
        if self.generation.num_beams > 1:
            conflicts.append(f"generation.num_beams is {self.generation.num_beams}, but PPO needs responses sampled "
                             "from the policy (beam search picks high-likelihood sequences, not samples): use "
                             "num_beams: 1 with temperature > 0")
        raise_conflicts(conflicts)
        return self
