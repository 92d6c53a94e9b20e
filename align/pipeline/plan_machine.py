"""The plan's machine checks: settings this version or machine cannot honour, the precision, attention and
threads it will use, and the memory estimate."""

from __future__ import annotations

from align.errors import Problem
from align.models.loading import ModelSource, four_bit_problem
from align.pipeline.plan_data import data_kind, longest_demonstration
from align.pipeline.plan_models import local_folder, tokenizer_in_folder
from align.registry.store import Registry
from align.stages import stage_kinds
from align.stages.tracker import report_names, tracker_problem, tracking_problems


def setting_problems(recipe, cfg, where: str, bad: set[str]) -> list[Problem]:
    """A stage's settings this version or machine cannot honour (kind, qlora, flash attention, trackers not
    built or not installed, tracking settings its trackers do not read, template file)."""
    problems = []
    if cfg.kind not in stage_kinds():
        problems.append(Problem(where, f"stage kind {cfg.kind!r} is not implemented in this version of align"))
    if cfg.method == "qlora" and "method" not in bad:
        why = four_bit_problem()
        if why:
            problems.append(Problem(f"{where}.method", f"qlora needs 4-bit support: {why}"))
    if cfg.attention.startswith("flash_attention") and "attention" not in bad:
        why = flash_attention_problem(cfg.attention)
        if why:
            problems.append(Problem(f"{where}.attention", why))
    if "report" not in bad:
        problems += [Problem(f"{where}.report", why) for name in report_names(cfg.report)
                     if (why := tracker_problem(name))]
    if "report" not in bad and "tracking" not in bad:
        problems += [Problem(f"{where}.{key}", why) for key, why in tracking_problems(cfg)]
    template = cfg.chat_template
    if template is not None and "{{" not in template and "{%" not in template and "chat_template" not in bad:
        if not recipe.resolve_path(template).is_file():
            problems.append(Problem(f"{where}.chat_template", f"{template}: neither a template nor a readable file"))
    return problems


def machine_notes(cfg) -> tuple[list[str], list[str]]:
    """What this machine makes of the stage's precision, attention and threads, each with its reason, and
    warnings for explicit settings the hardware makes slow (`align.runtime.precision`)."""
    from align.runtime.precision import device_facts, stage_precision

    precision = stage_precision(cfg)
    device = device_facts()
    attention = ("attention: sdpa (transformers' default)" if cfg.attention == "auto"
                 else f"attention: {cfg.attention} (set in the recipe)")
    notes = [f"precision: {precision.describe()}", attention]
    if device.kind == "cpu":
        notes.append(f"threads: {device.threads} (torch's default: one per core; OMP_NUM_THREADS changes it)")
    warnings = list(precision.warnings)
    if cfg.method == "qlora" and device.kind == "cpu":
        warnings.append("qlora on a CPU runs bitsandbytes' CPU kernels: about 11x the time of lora for about 8% "
                        "less memory on SmolLM2-135M; use method: lora unless memory forces 4-bit")
    return notes, warnings


def memory_note(recipe, cfg, source: ModelSource | None, registry: Registry) -> list[str]:
    """The stage's estimated peak memory (`align.pipeline.memory`) from the model's config.json, with the longest row
    of an SFT stage's data when the tokenizer is on disk."""
    from align.pipeline.memory import Shape, estimate_stage

    config_dir, tokenizer_dir = local_folder(source, registry)
    if config_dir is None or not (config_dir / "config.json").is_file():
        return ["memory: no estimate (the model's config.json is not on disk yet)"]
    try:
        shape = Shape.from_file(config_dir / "config.json")
    except (KeyError, ValueError, OSError) as err:
        return [f"memory: no estimate (config.json: {err})"]
    seq_len = (longest_demonstration(recipe, cfg, tokenizer_in_folder(tokenizer_dir)) if data_kind(cfg) == "conversations"
               else None)
    return ["memory: " + estimate_stage(shape, cfg, seq_len=seq_len).describe()]


def flash_attention_problem(kernel: str) -> str | None:
    """Why `kernel` (flash_attention_2/3) cannot run here, or None: it needs a CUDA GPU and its package."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return f"{kernel} needs a CUDA GPU; use auto, sdpa or eager here"
    package = "flash_attn" if kernel == "flash_attention_2" else "flash_attn_interface"
    if importlib.util.find_spec(package) is None:
        return f"{kernel} needs the {package} package (pip install flash-attn); or use auto or sdpa"
    return None
