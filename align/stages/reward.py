"""Reward stage: a one-output sequence classifier trained on preference pairs with a margin ranking loss.

Why it is built this way:
- The model is `AutoModelForSequenceClassification(num_labels=1)` on the parent's full weights, so the
  entry loads anywhere transformers does. With LoRA/QLoRA the score head is a PEFT `modules_to_save`
  module: fully trained, saved inside the adapter, restored on load (tests check scores survive reload).
- The loop is transformers' `Trainer` (checkpoints, exact resume, schedules, mixed precision) with our
  loss: chosen and rejected sides go through the model in one padded batch, scores are read at the last
  real token (see `align.rewards.scoring`), and the loss is a pure function from `align.objectives.ranking`.
- Speed is learning quality on a small machine: pairs are batched by length (little padding), bf16
  autocast is used where the hardware multiplies bf16 natively, prompts can be capped to their most recent
  tokens (`max_prompt_length`), and no LM head is ever computed.
- The quality gate is measured by the evaluation hook on held-out pairs after training: accuracy, ties,
  score mean and spread, gap, and a histogram PNG. A failing entry is still registered (it is a result)
  but marked failed, and PPO refuses it unless its recipe says `allow_failed_gate: true`.
"""

from __future__ import annotations

import logging

import torch

from align.config.stages import RewardStage
from align.data.prepare import prepare_pairs
from align.data.sampling import pad_right
from align.data.tokenize import EncodedPair
from align.eval.hook import evaluate_reward_model
from align.eval.plots import score_histogram_png
from align.models.shared_prompt import pair_groups
from align.objectives.ranking import pairwise_accuracy, reward_ranking_loss
from align.rewards.scoring import score_batch
from align.runtime.distributed import call_through
from align.stages import register_stage
from align.stages.base import EntryParts, Prepared, Stage, Trained, logged_history
from align.stages.building import build_model as build_scoring_model
from align.stages.callbacks import check_finite, safety_callbacks
from align.stages.context import StageContext
from align.stages.hf_training import PairBatchesMixin, train_and_time, training_arguments
from align.stages.sharded import trained_model

log = logging.getLogger(__name__)


def build_model(ctx: StageContext, tokenizer):
    """The sequence classifier on the parent's weights, with LoRA/QLoRA and a fully trained score head."""
    model, peft_cfg = build_scoring_model(ctx, tokenizer, head="score")
    model.reward_pooling = ctx.config.pooling
    return model, peft_cfg


class PairCollator:
    """Pairs -> one right-padded batch: the B chosen sequences first, then the B rejected ones."""

    def __init__(self, pad_id: int, margin: float):
        self.pad_id, self.margin = pad_id, margin

    def __call__(self, rows: list[dict]) -> dict:
        ids, mask = pad_right([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], self.pad_id)
        margins = [self.margin if r["margin"] is None else r["margin"] for r in rows]
        starts = [r["prompt_tokens"] for r in rows] * 2
        return {"input_ids": ids, "attention_mask": mask, "margin": torch.tensor(margins, dtype=torch.float32),
                "starts": torch.tensor(starts, dtype=torch.long)}


def as_dataset(pairs: list[EncodedPair]):
    from datasets import Dataset

    return Dataset.from_dict({"chosen_ids": [p.chosen.input_ids for p in pairs],
                              "rejected_ids": [p.rejected.input_ids for p in pairs],
                              "margin": [p.margin for p in pairs],
                              "prompt_tokens": [p.prompt_tokens for p in pairs],
                              "length": [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]})


def make_trainer(loss_kind: str, center_coef: float, grouped: bool = True, max_pass_tokens: int | None = None,
                 **kwargs):
    """A `Trainer` whose loss is the pairwise ranking loss on the model's scores; batches grouped by length
    in an order that depends only on seed and epoch (see `align.data.sampling`)."""
    from transformers import Trainer

    class PairwiseRewardTrainer(PairBatchesMixin, Trainer):
        group_by_length = grouped

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # score_batch calls the trunk and head directly, past the autocast that accelerate wraps around
            # model.forward, so mixed precision is entered here.
            with self.accelerator.autocast():
                scores = call_through(model, score_batch, inputs["input_ids"], inputs["attention_mask"],
                                      inputs["starts"], pair_groups(len(inputs["input_ids"])))  # through
                # DDP/FSDP's forward under several processes; each pair's prompt runs once (`align.models.shared_prompt`)
            chosen, rejected = scores.chunk(2)
            loss = reward_ranking_loss(chosen, rejected, inputs["margin"], loss_kind, center_coef)
            if model.training:
                check_finite(float(loss.detach()), self.state.global_step + 1)
                self._window.append((float(pairwise_accuracy(chosen.detach(), rejected.detach())),
                                     float((chosen - rejected).detach().mean())))
                loss = loss * self.pass_weight  # one of several passes over the batch (`training_step`)
            return (loss, torch.stack([chosen, rejected], dim=-1)) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if self._window and "loss" in logs:  # training accuracy and gap since the last log line
                logs["train_accuracy"] = round(sum(a for a, _ in self._window) / len(self._window), 4)
                logs["train_gap"] = round(sum(g for _, g in self._window) / len(self._window), 4)
                self._window.clear()
            super().log(logs, *args, **kwargs)

    def accuracy(prediction) -> dict:
        scores = torch.as_tensor(prediction.predictions)
        return {"accuracy": pairwise_accuracy(scores[:, 0], scores[:, 1])}

    trainer = PairwiseRewardTrainer(compute_metrics=accuracy, **kwargs)
    trainer.max_pass_tokens = max_pass_tokens
    trainer._window = []
    return trainer


@register_stage
class Reward(Stage):
    """A reward model: a sequence classifier trained on preference pairs, with a quality gate."""

    kind = "reward"
    config_type = RewardStage
    entry_kind = "reward"
    data_kind = "pairs"
    rows_per_example = 2
    lm_head = False

    def prepare(self, tokenizer) -> Prepared:
        train, heldout, report = prepare_pairs(self.ctx.recipe, self.cfg, tokenizer)
        return Prepared(train, heldout, report, unit="pairs")

    def build(self):
        return build_model(self.ctx, self.tokenizer)

    def train(self) -> Trained:
        from transformers import TrainingArguments

        ctx, cfg, data = self.ctx, self.cfg, self.data
        args = TrainingArguments(**training_arguments(ctx, self.model, "steps" if data.heldout and cfg.eval_steps
                                                      else "no", cfg.eval_steps), label_names=[])
        callbacks = safety_callbacks(ctx.budget, ctx.tracker)
        trainer = make_trainer(cfg.loss, cfg.center_coef, cfg.group_by_length, cfg.max_pass_tokens,
                               model=self.model, args=args, train_dataset=as_dataset(data.train),
                               eval_dataset=as_dataset(data.heldout) if data.heldout else None,
                               data_collator=PairCollator(self.tokenizer.pad_token_id, cfg.margin),
                               callbacks=callbacks)
        result, timings = train_and_time(ctx, trainer, self.resume_from, callbacks)
        model = trained_model(trainer, lambda: build_model(ctx, self.tokenizer)[0])  # None on other processes
        if model is not None:  # its pooling set where it was built (`build_model`)
            model.eval()
        return Trained(model, logged_history(trainer), timings, result.training_loss)

    def measure(self, trained: Trained) -> dict:
        cfg, heldout = self.cfg, self.data.heldout
        metrics, self.scores = evaluate_reward_model(trained.model, heldout, self.tokenizer.pad_token_id,
                                                     cfg.batch_size * 2)
        accuracy = metrics.get("pairwise_accuracy")
        self.gate = {"min_accuracy": cfg.gate.min_accuracy, "accuracy": accuracy,
                     "passed": accuracy is not None and accuracy >= cfg.gate.min_accuracy}
        if not heldout:
            self.gate.update(passed=False, why="no held-out pairs to measure")
        (log.info if self.gate["passed"] else log.warning)(
            "quality gate %s: held-out accuracy %s vs min_accuracy %.3f", "passed" if self.gate["passed"] else
            "FAILED", f"{accuracy:.3f}" if accuracy is not None else "n/a", cfg.gate.min_accuracy)
        return metrics

    def entry_parts(self, trained: Trained, metrics: dict) -> EntryParts:
        title = f"{self.ctx.entry_name}: held-out scores (accuracy {metrics.get('pairwise_accuracy', 0):.3f})"
        return EntryParts(kind="reward", artifact={"head": "score", "pooling": self.cfg.pooling},
                          adapter={"modules_to_save": ["score"]}, manifest={"gate": self.gate},
                          files=[lambda folder: score_histogram_png(*self.scores, folder / "score_histogram.png",
                                                                    title)])
