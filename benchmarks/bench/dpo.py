"""DPO, both sides: the stage's policy, precomputed reference and trainer (`align.stages.dpo`) against TRL's
`DPOTrainer` with its defaults (reference = the adapter switched off, every step) and a PEFT LoRA of the same
shape. TRL tokenizes text itself, so it gets our pairs' prompt and responses decoded from our token ids.
The align side's one-off reference pass is timed apart and reported beside its steps."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.bench.common import lora_config, stage_context, trl_common_args
from benchmarks.bench.measure import StepClock, mfu, peak_memory, trainer_clock
from benchmarks.bench.pairs import pair_tokens, prepared_pairs
from benchmarks.bench.workload import StageWork, Workload


def run(side: str, work: Workload, stage: StageWork, folder: Path) -> dict:
    import torch

    ctx = stage_context(work, stage, folder)
    torch.manual_seed(work.seed)
    tokenizer, train, heldout = prepared_pairs(ctx)
    clock = StepClock()
    notes, extra = [], {}
    if side == "align":
        from transformers import TrainingArguments

        from align.stages import dpo
        from align.stages.building import build_policy
        from align.stages.callbacks import safety_callbacks
        from align.stages.hf_training import training_arguments

        cfg = ctx.config
        model, _ = build_policy(ctx, tokenizer)
        if torch.cuda.is_available() and cfg.method != "qlora":  # as the stage does, before the reference pass
            from align.runtime import distributed

            model.to(distributed.device())
        mode = dpo.reference_mode(cfg)
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        reference = dpo.reference_logps(ctx, model, train, heldout, tokenizer.pad_token_id, {"bench": True})
        extra["reference_seconds"] = round(time.perf_counter() - started, 2)
        args = TrainingArguments(**training_arguments(ctx, model, "no", None), label_names=[])
        trainer = dpo.make_trainer(cfg, mode, None, model=model, args=args,
                                   train_dataset=dpo.as_dataset(train, reference["train"]),
                                   data_collator=dpo.PreferenceCollator(tokenizer.pad_token_id),
                                   callbacks=safety_callbacks(None) + [trainer_clock(clock)])
    else:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from align.models.loading import load_causal_lm

        model = load_causal_lm(ctx.parent, ctx.registry, dtype="auto")

        def text(ids):
            return tokenizer.decode(ids, skip_special_tokens=False)

        data = Dataset.from_dict({"prompt": [text(p.chosen.input_ids[:p.prompt_tokens]) for p in train],
                                  "chosen": [text(p.chosen.input_ids[p.prompt_tokens:]) for p in train],
                                  "rejected": [text(p.rejected.input_ids[p.prompt_tokens:]) for p in train]})
        trainer = DPOTrainer(model=model, args=DPOConfig(**trl_common_args(stage, work, folder),
                                                         max_length=stage.max_length, beta=ctx.config.beta),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora_config(work),
                             callbacks=[trainer_clock(clock)])
    trainer.train()
    out = clock.summary()
    out.update(peak_memory())
    out.update(extra)
    out["mfu"] = mfu(trainer.model, out["tokens_per_second"])
    out["examples"] = len(train)
    out["trained_tokens"] = pair_tokens(train)
    if "reference_seconds" in extra:
        per_step = extra["reference_seconds"] / max(1, out["steps"])
        notes.append(f"align's reference log-probs, computed once before training: {extra['reference_seconds']} s "
                     f"for {len(train) + len(heldout)} pairs ({per_step:.2f} s per trained step of this run; "
                     "TRL recomputes its reference inside every step)")
    out["notes"] = notes
    return out
