"""SFT, both sides: the stage's own trainer (`align.stages.sft.build_trainer`, the stage's model, data and
config) against TRL's `SFTTrainer` with its default settings and a PEFT LoRA of the same shape, on the same
pre-tokenized examples (our tokenization: identical token ids and labels on both sides)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench.common import heldout_nll, lora_config, stage_context, trl_common_args
from benchmarks.bench.measure import StepClock, mfu, peak_memory, trainer_clock
from benchmarks.bench.workload import StageWork, Workload


def _data(ctx):
    from align.models.loading import materialize
    from align.stages.building import stage_tokenizer
    from align.stages.sft import prepare_data

    ctx.parent = materialize(ctx.parent, ctx.registry)
    tokenizer = stage_tokenizer(ctx)
    train, heldout, _ = prepare_data(ctx, tokenizer)
    return tokenizer, train, heldout


def _trl_quantization(cfg):
    """QLoRA on the TRL side too: the same 4-bit settings as the stage's, so both sides train alike."""
    if cfg.method != "qlora":
        return None
    from align.models.loading import bnb_config

    return bnb_config(cfg)


def run(side: str, work: Workload, stage: StageWork, folder: Path) -> dict:
    import torch

    ctx = stage_context(work, stage, folder)
    torch.manual_seed(work.seed)
    tokenizer, train, heldout = _data(ctx)
    clock = StepClock()
    if side == "align":
        from align.stages.building import build_policy
        from align.stages.callbacks import safety_callbacks
        from align.stages.sft import build_trainer

        model, _ = build_policy(ctx, tokenizer)
        trainer = build_trainer(ctx, model, tokenizer, train, [], safety_callbacks(None) + [trainer_clock(clock)])
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from align.models.loading import load_causal_lm

        model = load_causal_lm(ctx.parent, ctx.registry, dtype="auto", quantization=_trl_quantization(ctx.config))
        data = Dataset.from_dict({"input_ids": [e.input_ids for e in train], "labels": [e.labels for e in train]})
        liger = {"use_liger_kernel": True} if work.liger else {}
        trainer = SFTTrainer(model=model, args=SFTConfig(**trl_common_args(stage, work, folder),
                                                         max_length=stage.max_length, **liger),
                             train_dataset=data, processing_class=tokenizer,
                             peft_config=None if ctx.config.method == "full" else lora_config(work),
                             callbacks=[trainer_clock(clock)])
    trainer.train()
    out = clock.summary()
    out.update(peak_memory())
    out["mfu"] = mfu(trainer.model, out["tokens_per_second"])
    out["heldout_loss"] = heldout_nll(trainer.model, heldout, tokenizer.pad_token_id)
    out["examples"] = len(train)
    out["trained_tokens"] = sum(len(e.input_ids) for e in train)
    return out
