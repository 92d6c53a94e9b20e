"""SFT stage: supervised fine-tuning on demonstrations, full, LoRA or QLoRA, on TRL's `SFTTrainer`.

Why it is built this way:
- Tokenization is ours (`align.data.tokenize`): labels cover assistant turns through EOS, whatever the
  chat template, and pad == EOS cannot unlabel EOS. TRL gets pre-tokenized `input_ids` + `labels` and
  skips its own preparation, so what is trained is exactly what our tests check.
- The trainer loop, checkpointing and resume are TRL/transformers'; we add a non-finite loss stop that
  fires before the optimizer step, and a SIGTERM handler that checkpoints and exits.
- Speed (`align.stages.sft_trainer`): the LM head runs at labelled positions only, no gradient
  checkpointing, length-grouped batches; `make bench` measures it against plain TRL on the same work.
- The evaluation hook runs on the trained model before the entry is committed, so the manifest holds
  its metrics from the start and an entry never exists without them.
"""

from __future__ import annotations

import logging

from align.config.stages import SFTStage
from align.data.prepare import apply_row_policy, check_dropped_share, heldout_split, load_demonstrations, tokenize_all
from align.errors import TrainingError
from align.eval.hook import evaluate_model
from align.stages import register_stage
from align.stages.base import Prepared, Stage, Trained, logged_history
from align.stages.building import build_policy
from align.stages.callbacks import safety_callbacks
from align.stages.context import StageContext
from align.stages.hf_training import train_and_time, training_arguments
from align.stages.registering import parent_baseline
from align.stages.sft_trainer import SFT_ARGS, make_sft_trainer
from align.stages.sharded import trained_model

log = logging.getLogger(__name__)


def prepare_data(ctx: StageContext, tokenizer):
    """Train and held-out examples plus the data report; raises before any training on bad data."""
    cfg, recipe = ctx.config, ctx.recipe
    conversations, report = load_demonstrations(recipe, cfg.data)
    apply_row_policy(conversations, report, cfg.on_bad_rows)
    rows = conversations.rows
    if cfg.eval_data is not None:
        eval_conv, eval_report = load_demonstrations(recipe, cfg.eval_data)
        apply_row_policy(eval_conv, eval_report, cfg.on_bad_rows)
        check_dropped_share(eval_report, cfg.max_dropped_share)  # each file on its own, as plan checks them
        train_rows, eval_rows = rows, eval_conv.rows
        train_at, eval_at, eval_where = conversations.kept_index, eval_conv.kept_index, str(cfg.eval_data.path)
    else:
        train_idx, eval_idx = heldout_split(len(rows), cfg.eval_split, cfg.seed)
        train_rows, eval_rows = [rows[i] for i in train_idx], [rows[i] for i in eval_idx]
        train_at = [conversations.kept_index[i] for i in train_idx]  # file rows, to name a dropped one
        eval_at, eval_where = [conversations.kept_index[i] for i in eval_idx], f"{cfg.data.path} (held-out)"
    train = tokenize_all(tokenizer, train_rows, cfg.max_length, cfg.assistant_only_loss, report, str(cfg.data.path),
                         train_at)
    heldout = tokenize_all(tokenizer, eval_rows, cfg.max_length, cfg.assistant_only_loss, report, eval_where, eval_at)
    report.kept = len(train) + len(heldout)
    check_dropped_share(report, cfg.max_dropped_share)
    if not train:
        raise TrainingError(f"{cfg.data.path}: no training examples left after checks")
    return train, heldout, report


@register_stage
class SFT(Stage):
    """Supervised fine-tuning on demonstrations; the one kind that may choose a new chat template."""

    kind = "sft"
    config_type = SFTStage
    may_set_chat_template = True
    default_parent = True

    @classmethod
    def heldout_demonstrations(cls, recipe, cfg, tokenizer) -> list:
        from types import SimpleNamespace

        return prepare_data(SimpleNamespace(config=cfg, recipe=recipe), tokenizer)[1]

    def prepare(self, tokenizer) -> Prepared:
        return Prepared(*prepare_data(self.ctx, tokenizer))

    def train(self) -> Trained:
        ctx, data = self.ctx, self.data
        callbacks = safety_callbacks(ctx.budget, ctx.tracker)
        trainer = build_trainer(ctx, self.model, self.tokenizer, data.train, data.heldout, callbacks)
        self.baseline = parent_baseline(ctx, self.model, self.tokenizer, data.heldout, self.resume_from)
        history = []
        if self.baseline is not None and data.heldout:
            history.append({"step": 0, "eval_loss": self.baseline.get("eval_loss")})
        result, timings = train_and_time(ctx, trainer, self.resume_from, callbacks)
        model = trained_model(trainer, lambda: build_policy(ctx, self.tokenizer)[0])  # None on other processes
        if model is not None:
            model.eval()
        return Trained(model, history + logged_history(trainer), timings, result.training_loss)

    def measure(self, trained: Trained) -> dict:
        return evaluate_model(self.ctx.recipe, trained.model, self.tokenizer, self.data.heldout)

    def entry_parts(self, trained, metrics):
        parts = super().entry_parts(trained, metrics)
        parts.manifest.update(self.baseline_manifest(self.baseline))
        return parts


def build_trainer(ctx: StageContext, model, tokenizer, train, heldout, callbacks):
    """The stage's trainer on pre-tokenized examples (`align.stages.sft_trainer`); `make bench` times this."""
    from datasets import Dataset
    from trl import SFTConfig

    cfg = ctx.config

    def as_dataset(examples):
        return Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                                  "labels": [e.labels for e in examples]})

    args = SFTConfig(**training_arguments(ctx, model, "steps" if heldout else "no", cfg.eval_steps or cfg.save_steps),
                     **SFT_ARGS, max_length=cfg.max_length, dataset_kwargs={"skip_prepare_dataset": True},
                     disable_tqdm=False)
    check_packing(ctx, model)
    return make_sft_trainer(max_pass_tokens=cfg.max_pass_tokens, packing=cfg.packing, model=model, args=args,
                            train_dataset=as_dataset(train),
                            eval_dataset=as_dataset(heldout) if heldout else None, processing_class=tokenizer,
                            callbacks=callbacks)


def check_packing(ctx: StageContext, model) -> None:
    """With `packing: true`, refuse a model whose attention would let packed conversations see each other
    (`align.data.packing.packing_problem`), before the first step rather than as a silently wrong loss."""
    from align.data.packing import packing_problem

    if ctx.config.packing:
        problem = packing_problem(model)
        if problem:
            raise TrainingError(f"stages.{ctx.name}.packing: {problem}")
        log.info("stages.%s: packing conversations into rows of at most %d tokens (position ids reset per "
                 "conversation, no attention across them)", ctx.name, ctx.config.max_length)
