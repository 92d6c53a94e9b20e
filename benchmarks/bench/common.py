"""Pieces every stage runner shares: the stage context a recipe run would build, and the TRL side's
arguments (TRL's own defaults, with only the workload's settings and our measurement hooks set)."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.bench.workload import StageWork, Workload, stage_recipe


def stage_context(work: Workload, stage: StageWork, folder: Path):
    """The `StageContext` `align run` would give this stage: same recipe config class, registry and parent."""
    from align.models.loading import resolve_model_ref
    from align.registry.store import Registry
    from align.stages.context import StageContext

    recipe = stage_recipe(work, stage, folder)
    registry = Registry(work.registry)
    parent = resolve_model_ref(work.model, registry, check_hub=False)
    return StageContext(recipe=recipe, name=stage.stage, config=recipe.stages[stage.stage], registry=registry,
                        parent=parent, runs_root=folder / "runs", force=True)


def trl_common_args(stage: StageWork, work: Workload, folder: Path) -> dict:
    """The settings both sides share; everything else stays at TRL's defaults (gradient checkpointing, bf16
    autocast, padding to the longest row of each batch, its loss implementation)."""
    return dict(output_dir=str(folder / "trl"), per_device_train_batch_size=stage.batch_size,
                gradient_accumulation_steps=stage.grad_accum, learning_rate=stage.lr, max_steps=stage.steps,
                lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none", seed=work.seed,
                use_cpu=not torch.cuda.is_available(), include_num_input_tokens_seen="non_padding",
                disable_tqdm=True, dataloader_num_workers=0)


def lora_config(work: Workload, task_type: str = "CAUSAL_LM", modules_to_save=None):
    from peft import LoraConfig

    return LoraConfig(r=work.lora["r"], lora_alpha=work.lora["alpha"], lora_dropout=work.lora["dropout"],
                      target_modules=work.lora["targets"], task_type=task_type, modules_to_save=modules_to_save)


@torch.no_grad()
def heldout_nll(model, examples, pad_id: int, batch_size: int = 8) -> float | None:
    """Token-weighted NLL of the labelled tokens of `examples` (fp32, no autocast): one figure computed the
    same way for both sides after training."""
    from align.data.sampling import pad_right
    from align.data.tokenize import IGNORE
    from align.models.logprobs import sequence_logps

    if not examples:
        return None
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids, mask = pad_right([e.input_ids for e in chunk], pad_id)
        labels, _ = pad_right([e.labels for e in chunk], IGNORE)
        with torch.autocast(device.type, enabled=False):
            sums, counts = sequence_logps(model, ids.to(device), mask.to(device), labels.to(device))
        total -= float(sums.double().sum())
        count += int(counts.sum())
    model.train(was)
    return round(total / max(1, count), 5)
