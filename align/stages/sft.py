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

from align.data.prepare import (DataReport, apply_row_policy, check_dropped_share, heldout_split,
                                load_demonstrations, tokenize_all)
from align.errors import TrainingError
from align.eval.hook import evaluate_model
from align.stages.sft_trainer import SFT_ARGS, make_sft_trainer
from align.stages.base import (StageContext, baseline_record, build_policy, check_trainable, parent_baseline,
                               register_entry, lora_targets, safety_callbacks, start_run, train_and_time,
                               training_arguments)
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


def run(ctx: StageContext):
    """Train, evaluate and register one SFT entry; returns the registry `Entry`."""
    tokenizer, (train, heldout, report), config_dump, _, (finished, resume_from) = start_run(
        ctx, lambda tokenizer: prepare_data(ctx, tokenizer))
    if finished is not None:
        return finished

    model, peft_cfg = build_policy(ctx, tokenizer)
    trainable, total = check_trainable(ctx, model)
    log.info("%s: %d train / %d held-out examples; %s trainable of %s parameters", ctx.entry_name,
             len(train), len(heldout), f"{trainable:,}", f"{total:,}")

    callbacks = safety_callbacks(ctx.budget)
    trainer = build_trainer(ctx, model, tokenizer, train, heldout, callbacks)
    history = []
    baseline = parent_baseline(ctx, model, tokenizer, heldout, resume_from)
    if baseline is not None and heldout:
        history.append({"step": 0, "eval_loss": baseline.get("eval_loss")})
    result, timings = train_and_time(ctx, trainer, resume_from, callbacks)
    history += [h for h in trainer.state.log_history if h.get("step", 0) > 0 or "loss" in h]

    model = trained_model(trainer, lambda: build_policy(ctx, tokenizer)[0])  # None on other processes
    if model is not None:
        model.eval()
    metrics = evaluate_model(ctx.recipe, model, tokenizer, heldout)
    metrics["train_loss"] = result.training_loss
    return register(ctx, model, tokenizer, peft_cfg, report, config_dump, history, timings, metrics, baseline)


def register(ctx: StageContext, model, tokenizer, peft_cfg, report: DataReport, config_dump: dict,
             history: list[dict], timings: dict, metrics: dict, baseline: dict | None):
    return register_entry(
        ctx, "policy", model, tokenizer, peft_cfg, report=report, config_dump=config_dump, history=history,
        timings=timings, metrics=metrics, adapter_extra={"targets": lora_targets(peft_cfg)},
        manifest_extra={"baseline": baseline_record(ctx, baseline)})


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
