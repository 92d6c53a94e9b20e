"""Reward model, both sides: the stage's model and trainer (`align.stages.reward.build_model`, `make_trainer`,
its collator and length-grouped batches) against TRL's `RewardTrainer` with its defaults and a PEFT LoRA of
the same shape (score head fully trained), on the same token ids (TRL takes pre-tokenized `chosen_ids` and
`rejected_ids`)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench.common import lora_config, stage_context, trl_common_args
from benchmarks.bench.measure import StepClock, mfu, peak_memory, trainer_clock
from benchmarks.bench.pairs import pair_tokens, prepared_pairs
from benchmarks.bench.workload import StageWork, Workload


def run(side: str, work: Workload, stage: StageWork, folder: Path) -> dict:
    import torch

    ctx = stage_context(work, stage, folder)
    torch.manual_seed(work.seed)
    tokenizer, train, _ = prepared_pairs(ctx)
    clock = StepClock()
    if side == "align":
        from transformers import TrainingArguments

        from align.stages import reward
        from align.stages.callbacks import safety_callbacks
        from align.stages.hf_training import training_arguments

        cfg = ctx.config
        model, _ = reward.build_model(ctx, tokenizer)  # with the stage's pooling
        args = TrainingArguments(**training_arguments(ctx, model, "no", None), label_names=[])
        trainer = reward.make_trainer(cfg.loss, cfg.center_coef, cfg.group_by_length, cfg.max_pass_tokens,
                                      model=model, args=args,
                                      train_dataset=reward.as_dataset(train),
                                      data_collator=reward.PairCollator(tokenizer.pad_token_id, cfg.margin),
                                      callbacks=safety_callbacks(None) + [trainer_clock(clock)])
    else:
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        from align.models.loading import load_sequence_classifier

        model = load_sequence_classifier(ctx.parent, ctx.registry, dtype="auto", pad_token_id=tokenizer.pad_token_id)
        data = Dataset.from_dict({"chosen_ids": [p.chosen.input_ids for p in train],
                                  "rejected_ids": [p.rejected.input_ids for p in train]})
        trainer = RewardTrainer(model=model, args=RewardConfig(**trl_common_args(stage, work, folder),
                                                               max_length=stage.max_length),
                                train_dataset=data, processing_class=tokenizer,
                                peft_config=lora_config(work, "SEQ_CLS", ["score"]), callbacks=[trainer_clock(clock)])
    trainer.train()
    out = clock.summary()
    out.update(peak_memory())
    out["mfu"] = mfu(trainer.model, out["tokens_per_second"])
    out["examples"] = len(train)
    out["trained_tokens"] = pair_tokens(train)
    return out
