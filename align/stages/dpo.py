"""DPO stage: direct preference optimisation and its variants, full, LoRA or QLoRA, from a registry ref.

Why it is built this way:
- The loop is transformers' `Trainer` (checkpoints, exact resume, schedules, mixed precision); the losses
  are the pure functions of `align.objectives.preference` (sigmoid, cDPO, IPO, hinge, and the reference-free SimPO and
  ORPO), and log-probabilities come from `align.models.logprobs`, which projects the LM head at response tokens
  only. TRL's `DPOTrainer` was measured first and was several times slower with the same model, adapter and
  reference (docs/results.md), because its fused head scores every position (prompts too) where Triton is
  missing. On a small machine speed is learning quality, so we keep ours.
- The reference: `precomputed` (the default) runs the parent once over train and held-out pairs before
  training, without gradients and length-sorted, and keeps two floats per pair in the run folder, so a
  resumed run does not recompute them and no second model stays in memory. Under several processes the
  pass is split among them and gathered (`sharded_pair_logps`); the main process writes the file. `adapter_disabled` (LoRA and
  QLoRA) evaluates the same weights with the adapter switched off each step; `copy` keeps a frozen copy.
- Data is the reward stage's: the same formats, checks, truncation and report (`align.data.prepare`),
  and the same length-grouped batch order fixed by seed and epoch (`align.data.sampling`).
- The tokenizer must be the parent's (`stage_tokenizer` refuses a different tokenizer or chat template).
- After training, the evaluation hook measures held-out implicit-reward accuracy, the chosen and rejected
  rewards and their margin, and the recipe's shared metrics (loss, perplexity, checkers, samples), and
  writes a histogram of held-out margins.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math

import torch

from align.config.stages import DPOStage
from align.data.prepare import prepare_pairs
from align.data.sampling import pad_right
from align.data.tokenize import IGNORE, EncodedPair
from align.eval.hook import evaluate_model
from align.eval.plots import margin_histogram_png
from align.models.logprobs import frozen_prefix_states, sequence_logps
from align.models.shared_prompt import pair_groups
from align.objectives.preference import PairLogps
from align.objectives.preference import preference_loss as registered_loss
from align.objectives.ranking import pairwise_accuracy
from align.runtime import distributed
from align.stages import register_stage
from align.stages.base import EntryParts, Prepared, Stage, Trained, logged_history
from align.stages.building import build_policy
from align.stages.callbacks import check_finite, safety_callbacks
from align.stages.dpo_reference import (SWITCHED_FILE, can_use_prefix, frozen_prefix_pays, pair_logps,
                                       reference_logps, sharded_pair_logps, switched_mode)
from align.stages.hf_training import PairBatchesMixin, train_and_time, training_arguments
from align.stages.registering import parent_baseline
from align.stages.sharded import trained_model

log = logging.getLogger(__name__)


def reference_mode(cfg) -> str | None:
    """How the stage gets reference log-probs, as configured: None for reference-free losses
    (`align.objectives.preference`); `auto` is `precomputed` until `chosen_reference` sees the model."""
    if registered_loss(cfg.loss).reference_free:
        return None
    return "precomputed" if cfg.reference == "auto" else cfg.reference


def chosen_reference(cfg, model, peft_cfg, train_pairs: int, run_dir) -> str | None:
    """`reference_mode`, with `auto` made `frozen_prefix` where that costs less than the precomputed pass
    (`align.stages.dpo_reference.frozen_prefix_pays`)."""
    mode = reference_mode(cfg)
    if mode is not None and frozen_prefix_pays(cfg, model, peft_cfg, train_pairs, run_dir):
        return "frozen_prefix"
    return mode


# ------------------------------------------------------------------------------------------ batches


class PreferenceCollator:
    """Pairs -> one right-padded batch: the B chosen sequences first, then the B rejected ones, with labels
    on the response tokens and, when precomputed, the reference log-probs."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        ids, mask = pad_right([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], self.pad_id)
        labels, _ = pad_right([r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows], IGNORE)
        reference = [r["ref_chosen"] for r in rows] + [r["ref_rejected"] for r in rows]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "reference": torch.tensor(reference, dtype=torch.float32)}


def as_dataset(pairs: list[EncodedPair], reference: torch.Tensor | None):
    from datasets import Dataset

    ref = reference.tolist() if reference is not None else [[math.nan, math.nan]] * len(pairs)
    return Dataset.from_dict({"chosen_ids": [p.chosen.input_ids for p in pairs],
                              "chosen_labels": [p.chosen.labels for p in pairs],
                              "rejected_ids": [p.rejected.input_ids for p in pairs],
                              "rejected_labels": [p.rejected.labels for p in pairs],
                              "ref_chosen": [r[0] for r in ref], "ref_rejected": [r[1] for r in ref],
                              "length": [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]})


# ------------------------------------------------------------------------------------------ reference


# ------------------------------------------------------------------------------------------ loss


def preference_loss(cfg, logp: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None):
    """(loss, chosen reward [B], rejected reward [B]) for one batch of summed log-probs laid out [chosen;
    rejected], by the registered loss `cfg.loss`, on the sums or per-token means it reads. Rewards are the
    implicit rewards beta * (pi - ref), or for reference-free losses beta * mean log-prob (SimPO's reward).
    `rpo_alpha` adds the chosen side's per-token NLL to reference-based losses."""
    objective = registered_loss(cfg.loss)
    if objective.reference_free:
        reference = None
    pairs = PairLogps.from_batch(logp, counts, None if reference is None else reference.to(logp.device),
                                 per_token=objective.mean_logps)
    loss, chosen_reward, rejected_reward = objective(pairs, cfg)
    if cfg.rpo_alpha and not objective.reference_free:
        loss = loss + cfg.rpo_alpha * pairs.chosen_nll.mean()
    return loss, chosen_reward, rejected_reward


def make_trainer(cfg, mode: str | None, ref_model=None, **kwargs):
    """A `Trainer` whose loss is the configured preference loss; batches grouped by length in an order fixed
    by seed and epoch."""
    from transformers import Trainer

    class PreferenceTrainer(PairBatchesMixin, Trainer):
        group_by_length = cfg.group_by_length

        def batch_logps(self, model, inputs, prefix=None):
            # sequence_logps calls the trunk and head directly, past the autocast accelerate wraps around
            # model.forward, so mixed precision is entered here.
            # Through the wrapper's forward under several processes (`distributed.call_through`).
            top = {} if prefix is None else {"prefix": prefix, "start": cfg.freeze_layers}
            with self.accelerator.autocast():
                return distributed.call_through(
                    model, lambda m, *args: sequence_logps(m, *args, **top), inputs["input_ids"],
                    inputs["attention_mask"], inputs["labels"], pair_groups(len(inputs["input_ids"])))

        def frozen_prefix(self, model, inputs):
            """The frozen bottom blocks' output, once for the policy and its reference (`frozen_prefix`)."""
            if mode != "frozen_prefix":
                return None
            inner = self.accelerator.unwrap_model(model)
            with torch.no_grad(), self.accelerator.autocast():
                return frozen_prefix_states(inner, inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                                            pair_groups(len(inputs["input_ids"])), cfg.freeze_layers)

        def reference(self, model, inputs, prefix=None):
            if mode in (None, "precomputed"):
                return inputs["reference"]
            with torch.no_grad():
                if mode in ("adapter_disabled", "frozen_prefix"):  # no gradients: the unwrapped model, outside DDP
                    inner = self.accelerator.unwrap_model(model)
                    with inner.disable_adapter():
                        return self.batch_logps(inner, inputs, prefix)[0]
                return self.batch_logps(ref_model, inputs)[0]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            prefix = self.frozen_prefix(model, inputs)
            reference = self.reference(model, inputs, prefix)
            logp, counts = self.batch_logps(model, inputs, prefix)
            loss, chosen, rejected = preference_loss(cfg, logp, counts, reference)
            if model.training:
                check_finite(float(loss.detach()), self.state.global_step + 1)
                self._window.append((float(pairwise_accuracy(chosen, rejected)), float(chosen.mean()),
                                     float(rejected.mean())))
                loss = loss * self.pass_weight  # one of several passes over the batch (`training_step`)
            return (loss, torch.stack([chosen, rejected], dim=-1)) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if self._window and "loss" in logs:  # training figures since the last log line
                n = len(self._window)
                logs["train_accuracy"] = round(sum(w[0] for w in self._window) / n, 4)
                logs["rewards_chosen"] = round(sum(w[1] for w in self._window) / n, 4)
                logs["rewards_rejected"] = round(sum(w[2] for w in self._window) / n, 4)
                logs["rewards_margin"] = round(logs["rewards_chosen"] - logs["rewards_rejected"], 4)
                self._window.clear()
            super().log(logs, *args, **kwargs)

    def accuracy(prediction) -> dict:
        rewards = torch.as_tensor(prediction.predictions)
        return {"accuracy": pairwise_accuracy(rewards[:, 0], rewards[:, 1]),
                "margin": float((rewards[:, 0] - rewards[:, 1]).mean())}

    trainer = PreferenceTrainer(compute_metrics=accuracy, **kwargs)
    trainer.max_pass_tokens = cfg.max_pass_tokens
    trainer._window = []
    return trainer


# ------------------------------------------------------------------------------------------ evaluation


def preference_metrics(cfg, model, pairs: list[EncodedPair], reference: torch.Tensor | None, pad_id: int,
                       batch_size: int) -> tuple[dict, list[float]]:
    """Held-out implicit-reward accuracy (ties count half), chosen and rejected rewards and their margin.
    Returns the metrics and the per-pair margins (for the histogram)."""
    if not pairs:
        return {}, []
    policy = pair_logps(model, pairs, pad_id, batch_size)
    counts = torch.tensor([[p.chosen.trainable, p.rejected.trainable] for p in pairs], dtype=torch.float64)
    if reference is None:  # reference-free: SimPO's reward, beta * mean log-prob
        rewards = cfg.beta * policy / counts.clamp(min=1)
    else:
        rewards = cfg.beta * (policy - reference.double())
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    margin = chosen - rejected
    return {"preference_accuracy": pairwise_accuracy(chosen, rejected),
            "rewards_chosen": float(chosen.mean()), "rewards_rejected": float(rejected.mean()),
            "reward_margin": float(margin.mean()), "reward_margin_std": float(margin.std()) if len(pairs) > 1 else 0.0,
            "logps_chosen": float(policy[:, 0].mean()), "logps_rejected": float(policy[:, 1].mean()),
            "pairs": len(pairs)}, margin.tolist()


# ------------------------------------------------------------------------------------------ run


@register_stage
class DPO(Stage):
    """Direct preference optimisation and its variants, against a reference (precomputed, the adapter
    switched off, or a copy) or reference-free."""

    kind = "dpo"
    config_type = DPOStage
    data_kind = "pairs"
    rows_per_example = 2

    @classmethod
    def keeps_reference_copy(cls, cfg) -> bool:
        return cfg.reference == "copy"

    def prepare(self, tokenizer) -> Prepared:
        train, heldout, report = prepare_pairs(self.ctx.recipe, self.cfg, tokenizer)
        return Prepared(train, heldout, report, unit="pairs")

    def build(self):
        model, peft_cfg = build_policy(self.ctx, self.tokenizer)
        if torch.cuda.is_available() and self.cfg.method != "qlora":  # the reference pass runs before the Trainer
            model.to(distributed.device())                            # moves it
        return model, peft_cfg

    def describe(self) -> str:
        return f"; loss {self.cfg.loss}"

    def references(self):
        """(mode, reference model or None, reference log-probs {"train", "heldout"}); held-out log-probs are
        measured once up front for every mode that has a reference."""
        ctx, cfg, data, model = self.ctx, self.cfg, self.data, self.model
        pad_id = self.tokenizer.pad_token_id
        mode = chosen_reference(cfg, model, self.peft_cfg, len(data.train), ctx.run_dir)
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
        if mode in ("adapter_disabled", "frozen_prefix", "copy"):
            with (contextlib.nullcontext() if mode == "copy" else model.disable_adapter()):
                reference["heldout"] = sharded_pair_logps(ref_model or model, data.heldout, pad_id,
                                                          cfg.batch_size * 2)
        log.info("%s: reference %s", ctx.entry_name, mode or "none (reference-free loss)")
        self.reference_used = mode
        return mode, ref_model, reference

    def train(self) -> Trained:
        from transformers import TrainingArguments

        ctx, cfg, data = self.ctx, self.cfg, self.data
        mode, ref_model, self.reference = self.references()
        self.baseline = parent_baseline(ctx, self.model, self.tokenizer, [p.chosen for p in data.heldout],
                                        self.resume_from)
        args = TrainingArguments(**training_arguments(ctx, self.model, "steps" if data.heldout and cfg.eval_steps
                                                      else "no", cfg.eval_steps), label_names=[])
        callbacks = safety_callbacks(ctx.budget, ctx.tracker)
        trainer = make_trainer(cfg, mode, ref_model, model=self.model, args=args,
                               train_dataset=as_dataset(data.train, self.reference["train"]),
                               eval_dataset=as_dataset(data.heldout, self.reference["heldout"]) if data.heldout
                               else None,
                               data_collator=PreferenceCollator(self.tokenizer.pad_token_id), callbacks=callbacks)
        result, timings = train_and_time(ctx, trainer, self.resume_from, callbacks)
        timings["reference"] = mode
        model = trained_model(trainer, lambda: build_policy(ctx, self.tokenizer)[0])  # None on other processes
        if model is not None:
            model.eval()
        return Trained(model, logged_history(trainer), timings, result.training_loss)

    def measure(self, trained: Trained) -> dict:
        cfg, heldout, pad_id = self.cfg, self.data.heldout, self.tokenizer.pad_token_id
        metrics, self.margins = distributed.on_main(lambda: preference_metrics(
            cfg, trained.model, heldout, self.reference["heldout"], pad_id, cfg.batch_size * 2))
        if metrics:
            log.info("held-out: preference accuracy %.3f, reward margin %.3f (chosen %.3f, rejected %.3f)",
                     metrics["preference_accuracy"], metrics["reward_margin"], metrics["rewards_chosen"],
                     metrics["rewards_rejected"])
        metrics.update(evaluate_model(self.ctx.recipe, trained.model, self.tokenizer, [p.chosen for p in heldout]))
        return metrics

    def entry_parts(self, trained: Trained, metrics: dict) -> EntryParts:
        parts = super().entry_parts(trained, metrics)
        title = f"{self.ctx.entry_name}: held-out reward margins (accuracy {metrics.get('preference_accuracy', 0):.3f})"
        parts.files.append(lambda folder: margin_histogram_png(self.margins, folder / "margin_histogram.png", title))
        parts.manifest.update({**self.baseline_manifest(self.baseline),
                               "preference": {"loss": self.cfg.loss, "beta": self.cfg.beta,
                                              "reference": self.reference_used}})
        return parts
