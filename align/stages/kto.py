"""KTO stage: alignment from unpaired feedback (a completion labelled desirable or undesirable), full, LoRA or
QLoRA, from a registry ref (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization").

Why it is built this way:
- It is DPO's relative and reuses its parts: the Trainer mixin (length-grouped batches fixed by seed and
  epoch, passes under `max_pass_tokens`), the LM head at response tokens only, the reference log-probs
  precomputed once in the run folder (or, when the time limit could not hold that pass, computed per step),
  the held-out implicit-reward pairwise accuracy, the evaluation hook and the parent baseline.
- The loss is the pure function `align.objectives.unpaired` (`kto`); its reference point z0 (the batch's
  KL estimate) is measured on each row's mismatched combination, its prompt with another row's completion
  fixed ahead of time by seed (`align.data.prepare_unpaired`), so the reference log-probs of those too are
  precomputed in the same pass, each row and its combination sharing one prompt pass
  (`align.stages.dpo_reference.pair_logps`). `kl_estimate: none` takes z0 = 0 and skips that pass.
- Data: unpaired rows (prompt, completion, label), or the DPO stage's preference pairs, each pair split into
  a desirable and an undesirable row; bad rows named and counted, as for pairs.
- The config is defined here, beside the kind (`config_type`), as a recipe's stages accept every registered
  kind's config.
- After training: held-out mean implicit rewards of desirable and undesirable rows and their gap, the label
  accuracy (a row's reward on the side of z0 its label says, ties half), the pairwise accuracy of the
  held-out rows that came from pairs, the shared evaluation hook, and a histogram of held-out rewards.
"""

from __future__ import annotations

import copy
import logging
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from align.config.schema import PreferenceData, StageBase, raise_conflicts
from align.config.stages import reference_conflicts
from align.data.prepare_unpaired import prepare_feedback
from align.eval.hook import evaluate_model
from align.eval.plots import score_histogram_png
from align.objectives.ranking import pairwise_accuracy
from align.objectives.registry import registered_name
from align.objectives.unpaired import label_accuracy
from align.runtime import distributed
from align.stages import register_stage
from align.stages.base import EntryParts, Prepared, Stage, Trained, logged_history
from align.stages.building import build_policy
from align.stages.callbacks import safety_callbacks
from align.stages.dpo_reference import (SWITCHED_FILE, can_use_prefix, frozen_prefix_pays, pair_logps,
                                       reference_logps, sharded_pair_logps, switched_mode)
from align.stages.hf_training import train_and_time, training_arguments
from align.stages.kto_trainer import FeedbackCollator, as_dataset, make_trainer
from align.stages.registering import parent_baseline
from align.stages.sharded import trained_model

log = logging.getLogger(__name__)


class KTOStage(StageBase, PreferenceData):
    """`loss` (a name registered in `align.objectives.unpaired`): kto. `desirable_weight` and
    `undesirable_weight` weigh the two kinds of rows (the paper advises w_d * n_d / (w_u * n_u) in [1, 4/3];
    the plan says which weights would get there). `kl_estimate`: mismatched (z0 from each row's prompt with
    another row's completion) or none (z0 = 0: no extra pass). `reference`: as DPO's (`auto`: frozen_prefix
    where it costs less than precomputed, `align.stages.dpo_reference.frozen_prefix_pays`)."""

    kind: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0)
    loss: Annotated[str, registered_name("align.objectives.unpaired.UNPAIRED_LOSSES")] = "kto"
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    kl_estimate: Literal["mismatched", "none"] = "mismatched"
    reference: Literal["auto", "precomputed", "frozen_prefix", "adapter_disabled", "copy"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> KTOStage:
        conflicts = reference_conflicts(self)
        if self.margin_field is not None:
            conflicts.append("margin_field is read by the reward stage; KTO's rows carry no margin")
        raise_conflicts(conflicts)
        return self


def feedback_metrics(cfg, model, rows: list, reference: torch.Tensor, pad_id: int,
                     batch_size: int) -> tuple[dict, tuple[list[float], list[float]]]:
    """Held-out figures (module docstring) and the rewards of desirable and undesirable rows (the histogram).
    `reference` [N, 2]: the reference's log-probs of each row and of its mismatched combination."""
    if not rows:
        return {}, ([], [])
    ratio = pair_logps(model, rows, pad_id, batch_size) - reference.double()
    r = ratio[:, 0]
    z0 = float(ratio[:, 1].mean().clamp(min=0)) if rows[0].mismatched is not None else 0.0
    rewards = cfg.beta * r
    desirable = torch.tensor([row.desirable for row in rows])
    metrics = {"label_accuracy": label_accuracy(r, desirable, z0), "kl_estimate": z0, "rows": len(rows),
               "desirable_rows": int(desirable.sum())}
    for name, chosen in (("rewards_desirable", desirable), ("rewards_undesirable", ~desirable)):
        if chosen.any():
            metrics[name] = float(rewards[chosen].mean())
    if desirable.any() and (~desirable).any():
        metrics["reward_gap"] = metrics["rewards_desirable"] - metrics["rewards_undesirable"]
    sides: dict[int, dict[bool, float]] = {}
    for row, reward in zip(rows, rewards.tolist()):
        if row.from_pair:
            sides.setdefault(row.index, {})[row.desirable] = reward
    pairs = [(s[True], s[False]) for s in sides.values() if len(s) == 2]
    if pairs:
        chosen, rejected = (torch.tensor(side, dtype=torch.float64) for side in zip(*pairs))
        metrics.update({"preference_accuracy": pairwise_accuracy(chosen, rejected),
                        "reward_margin": float((chosen - rejected).mean()), "pairs": len(pairs)})
    return metrics, (rewards[desirable].tolist(), rewards[~desirable].tolist())


@register_stage
class KTO(Stage):
    """KTO on unpaired feedback, against a reference (precomputed, the adapter switched off, or a copy)."""

    kind = "kto"
    config_type = KTOStage
    data_kind = "feedback"
    rows_per_example = 1  # the trained pass; the mismatched combinations run without gradients

    @classmethod
    def keeps_reference_copy(cls, cfg) -> bool:
        return cfg.reference == "copy"

    def prepare(self, tokenizer) -> Prepared:
        train, heldout, report = prepare_feedback(self.ctx.recipe, self.cfg, tokenizer)
        return Prepared(train, heldout, report, unit="rows")

    def build(self):
        model, peft_cfg = build_policy(self.ctx, self.tokenizer)
        if torch.cuda.is_available() and self.cfg.method != "qlora":  # the reference pass runs before the Trainer
            model.to(distributed.device())                            # moves it
        return model, peft_cfg

    def describe(self) -> str:
        return f"; loss {self.cfg.loss}, KL estimate {self.cfg.kl_estimate}"

    def references(self):
        """(mode, reference model or None, reference log-probs {"train", "heldout"} [N, 2]), as DPO's: held-out
        ones are measured once up front in every mode."""
        ctx, cfg, data, model = self.ctx, self.cfg, self.data, self.model
        pad_id = self.tokenizer.pad_token_id
        mode = "precomputed" if cfg.reference == "auto" else cfg.reference
        if frozen_prefix_pays(cfg, model, self.peft_cfg, len(data.train), ctx.run_dir):
            mode = "frozen_prefix"
        ref_model, reference = None, {"train": None, "heldout": None}
        if mode == "precomputed":
            may_switch = (cfg.reference == "auto" and self.peft_cfg is not None and distributed.world_size() == 1
                          and not self.resume_from)
            per_step = "frozen_prefix" if can_use_prefix(cfg, model, self.peft_cfg) else "adapter_disabled"
            reference = reference_logps(ctx, model, data.train, data.heldout, pad_id, self.fingerprint,
                                        may_switch or (ctx.run_dir / SWITCHED_FILE).is_file(), per_step)
            if reference is None:
                mode, reference = switched_mode(ctx.run_dir), {"train": None, "heldout": None}
        elif mode == "copy":
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if mode != "precomputed":
            if mode == "copy":
                reference["heldout"] = sharded_pair_logps(ref_model, data.heldout, pad_id, cfg.batch_size * 2)
            else:
                with model.disable_adapter():
                    reference["heldout"] = sharded_pair_logps(model, data.heldout, pad_id, cfg.batch_size * 2)
        log.info("%s: reference %s", ctx.entry_name, mode)
        self.reference_used = mode
        return mode, ref_model, reference

    def train(self) -> Trained:
        from transformers import TrainingArguments

        ctx, cfg, data = self.ctx, self.cfg, self.data
        mode, ref_model, self.reference = self.references()
        self.baseline = parent_baseline(ctx, self.model, self.tokenizer, self.desirable_heldout(), self.resume_from)
        args = TrainingArguments(**training_arguments(ctx, self.model, "steps" if data.heldout and cfg.eval_steps
                                                      else "no", cfg.eval_steps), label_names=[])
        callbacks = safety_callbacks(ctx.budget, ctx.tracker)
        trainer = make_trainer(cfg, mode, ref_model, model=self.model, args=args,
                               train_dataset=as_dataset(data.train, self.reference["train"]),
                               eval_dataset=as_dataset(data.heldout, self.reference["heldout"]) if data.heldout
                               else None,
                               data_collator=FeedbackCollator(self.tokenizer.pad_token_id), callbacks=callbacks)
        result, timings = train_and_time(ctx, trainer, self.resume_from, callbacks)
        timings["reference"] = mode
        model = trained_model(trainer, lambda: build_policy(ctx, self.tokenizer)[0])  # None on other processes
        if model is not None:
            model.eval()
        return Trained(model, logged_history(trainer), timings, result.training_loss)

    def desirable_heldout(self) -> list:
        """The held-out desirable completions: what the evaluation hook's loss reads (DPO's chosen sides)."""
        return [row.completion for row in self.data.heldout if row.desirable]

    def measure(self, trained: Trained) -> dict:
        cfg, heldout, pad_id = self.cfg, self.data.heldout, self.tokenizer.pad_token_id
        metrics, self.rewards = distributed.on_main(lambda: feedback_metrics(
            cfg, trained.model, heldout, self.reference["heldout"], pad_id, cfg.batch_size * 2))
        if metrics:
            log.info("held-out: label accuracy %.3f, reward gap %s, KL estimate %.3f%s", metrics["label_accuracy"],
                     f"{metrics['reward_gap']:.3f}" if "reward_gap" in metrics else "n/a", metrics["kl_estimate"],
                     f", preference accuracy {metrics['preference_accuracy']:.3f}" if "pairs" in metrics else "")
        metrics.update(evaluate_model(self.ctx.recipe, trained.model, self.tokenizer, self.desirable_heldout()))
        return metrics

    def entry_parts(self, trained: Trained, metrics: dict) -> EntryParts:
        parts = super().entry_parts(trained, metrics)
        accuracy = metrics.get("label_accuracy", 0)
        title = f"{self.ctx.entry_name}: held-out implicit rewards (label accuracy {accuracy:.3f})"
        parts.files.append(lambda folder: score_histogram_png(
            *self.rewards, folder / "reward_histogram.png", title, names=("desirable", "undesirable"),
            xlabel="implicit reward beta * (log pi - log ref)", ylabel="rows"))
        cfg = self.cfg
        parts.manifest.update({**self.baseline_manifest(self.baseline),
                               "preference": {"loss": cfg.loss, "beta": cfg.beta,
                                              "weights": {"desirable": cfg.desirable_weight,
                                                          "undesirable": cfg.undesirable_weight},
                                              "reference": self.reference_used, "kl_estimate": cfg.kl_estimate}})
        return parts
