"""SFT stage: supervised fine-tuning on demonstrations, full, LoRA or QLoRA, on TRL's `SFTTrainer`.

Why it is built this way:
- Tokenization is ours (`align.data.tokenize`): labels cover assistant turns through EOS, whatever the
  chat template, and pad == EOS cannot unlabel EOS. TRL gets pre-tokenized `input_ids` + `labels` and
  skips its own preparation, so what is trained is exactly what our tests check.
- The trainer loop, checkpointing and resume are TRL/transformers'; we add a non-finite loss stop that
  fires before the optimizer step, and a SIGTERM handler that checkpoints and exits.
- Speed (`align.stages.sft_trainer`): the LM head runs at labelled positions only, no gradient
  checkpointing, length-grouped batches; `align bench` measures it against plain TRL on the same work.
- The evaluation hook runs on the trained model before the entry is committed, so the manifest holds
  its metrics from the start and an entry never exists without them.
"""

from __future__ import annotations

import json
import logging

import torch

from align.data.prepare import (DataReport, apply_row_policy, check_dropped_share, heldout_split,
                                load_demonstrations, tokenize_all)
from align.distributed import is_main
from align.errors import TrainingError
from align.evaluate import evaluate_model
from align.fingerprint import hash_json, tokenizer_facts
from align.models import count_parameters, materialize
from align.registry import write_json_atomic
from align.stages.sft_trainer import SFT_ARGS, make_sft_trainer
from align.stages.base import (StageContext, build_policy, prepare_run_dir, register_entry,
                               lora_targets, safety_callbacks, stage_tokenizer, train_and_time, training_arguments)
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
        train_rows, eval_rows = rows, eval_conv.rows
    else:
        train_idx, eval_idx = heldout_split(len(rows), cfg.eval_split, cfg.seed)
        train_rows, eval_rows = [rows[i] for i in train_idx], [rows[i] for i in eval_idx]
    train = tokenize_all(tokenizer, train_rows, cfg.max_length, cfg.assistant_only_loss, report, str(cfg.data.path))
    heldout = tokenize_all(tokenizer, eval_rows, cfg.max_length, cfg.assistant_only_loss, report,
                           f"{cfg.data.path} (held-out)")
    report.kept = len(train) + len(heldout)
    check_dropped_share(report, cfg.max_dropped_share)
    if not train:
        raise TrainingError(f"{cfg.data.path}: no training examples left after checks")
    return train, heldout, report


def run(ctx: StageContext):
    """Train, evaluate and register one SFT entry; returns the registry `Entry`."""
    cfg = ctx.config
    torch.manual_seed(cfg.seed)
    ctx.parent = materialize(ctx.parent, ctx.registry)
    tokenizer = stage_tokenizer(ctx)
    train, heldout, report = prepare_data(ctx, tokenizer)
    config_dump = cfg.model_dump(by_alias=True)
    fingerprint = {"config": hash_json(config_dump), "data": report.fingerprint, "seed": cfg.seed,
                   "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                   "parent": ctx.parent.lineage(), "tokenizer": tokenizer_facts(tokenizer)["hash"]}
    resume_from = prepare_run_dir(ctx.run_dir, fingerprint, ctx.force)

    model, peft_cfg = build_policy(ctx, tokenizer)
    trainable, total = count_parameters(model)
    log.info("%s: %d train / %d held-out examples; %s trainable of %s parameters", ctx.entry_name,
             len(train), len(heldout), f"{trainable:,}", f"{total:,}")

    callbacks = safety_callbacks(cfg.time_limit_minutes)
    trainer = build_trainer(ctx, model, tokenizer, train, heldout, callbacks)
    history = []
    baseline = None
    if resume_from is None:
        # LoRA starts as the identity and full fine-tuning from the parent's weights: this is the parent,
        # measured by the same hook, so the manifest shows the change the stage made.
        log.info("evaluating the parent before training")
        baseline = evaluate_model(ctx.recipe, model, tokenizer, heldout)
        if is_main():
            write_json_atomic(ctx.run_dir / "baseline.json", baseline)
    elif (ctx.run_dir / "baseline.json").is_file():
        baseline = json.loads((ctx.run_dir / "baseline.json").read_text())
    if baseline is not None:
        if heldout:
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
        manifest_extra={"baseline": {"of": ctx.parent.lineage(), "metrics": baseline} if baseline else None})


def build_trainer(ctx: StageContext, model, tokenizer, train, heldout, callbacks):
    """The stage's trainer on pre-tokenized examples (`align.stages.sft_trainer`); `align bench` times this."""
    from datasets import Dataset
    from trl import SFTConfig

    cfg = ctx.config

    def as_dataset(examples):
        return Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                                  "labels": [e.labels for e in examples]})

    args = SFTConfig(**training_arguments(ctx, model, "steps" if heldout else "no", cfg.eval_steps or cfg.save_steps),
                     **SFT_ARGS, max_length=cfg.max_length, dataset_kwargs={"skip_prepare_dataset": True},
                     disable_tqdm=False)
    return make_sft_trainer(max_pass_tokens=cfg.max_pass_tokens, model=model, args=args, train_dataset=as_dataset(train),
                            eval_dataset=as_dataset(heldout) if heldout else None, processing_class=tokenizer,
                            callbacks=callbacks)
