"""A trained stage becomes one registry entry; its parent is measured first, so the manifest shows the change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from align.config.recipe import recipe_record
from align.eval.plots import training_curve_png
from align.registry.fingerprint import hash_json, library_versions, tokenizer_facts
from align.registry.records import write_json_atomic
from align.runtime.distributed import main_only
from align.stages.context import StageContext
from align.stages.run_folder import record_finished

log = logging.getLogger(__name__)


def base_lineage(ctx: StageContext) -> dict:
    """The root of the lineage: a base entry itself, else whatever base the parent records."""
    entry = ctx.parent.entry
    if entry is None:
        return ctx.parent.lineage()
    if entry.kind == "base":
        return {"source": "registry", "ref": entry.ref}
    return entry.manifest.get("base") or ctx.parent.lineage()


def parent_baseline(ctx: StageContext, model, tokenizer, examples, resume_from: Path | None) -> dict | None:
    """The evaluation hook on the stage's model before its first step, which is the parent (a fresh LoRA adapter
    is the identity; full fine-tuning starts from the parent's weights), measured like the entry will be, so
    the manifest shows the change the stage made. Kept in the run folder: a resumed run compares against the
    same numbers (None when a resumed folder predates that)."""
    import time

    from align.eval.hook import evaluate_model
    from align.runtime.distributed import is_main

    path, timing = ctx.run_dir / "baseline.json", ctx.run_dir / "baseline_seconds.json"
    if resume_from is not None:
        if timing.is_file():  # the evaluation after training is the same work: keep it its time
            ctx.budget.reserve(json.loads(timing.read_text())["seconds"])
        return json.loads(path.read_text()) if path.is_file() else None
    log.info("evaluating the parent before training")
    started = time.monotonic()
    baseline = evaluate_model(ctx.recipe, model, tokenizer, examples)
    seconds = time.monotonic() - started
    ctx.budget.reserve(seconds)
    if is_main():
        write_json_atomic(path, baseline)
        write_json_atomic(timing, {"seconds": round(seconds, 2)})
    ctx.tracker.log_evaluation(0, baseline)  # the parent's figures start the curves, at step 0
    return baseline


def baseline_record(ctx: StageContext, baseline: dict | None) -> dict | None:
    """How a manifest records the parent's `baseline`: what was measured and its metrics."""
    return {"of": ctx.parent.lineage(), "metrics": baseline} if baseline else None


def _saved_bytes(model, adapter: bool) -> int:
    """About what saving `model` writes: its trainable weights (an adapter's) or all of them."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not adapter)


@main_only  # the other processes wait, then get the same Entry
def register_entry(ctx: StageContext, kind: str, model, tokenizer, peft_cfg, *, report, config_dump: dict,
                   history: list[dict], timings: dict, metrics: dict, artifact_extra: dict | None = None,
                   adapter_extra: dict | None = None, manifest_extra: dict | None = None, extra_files=()):
    """Save a trained stage as one registry entry (atomically): adapter or full weights, tokenizer, training
    curve, the stage's pictures and other files (`extra_files`: callables given the entry folder), and the
    manifest with its lineage. Every stage registers through here, so every manifest has the same shape."""
    cfg = ctx.config
    with ctx.registry.create(ctx.entry_name, kind) as draft:
        draft.expected_bytes = _saved_bytes(model, adapter=peft_cfg is not None)  # told if the disk fills up
        if peft_cfg is not None:
            model.save_pretrained(draft.path / "adapter")
            artifact = {"type": "adapter", "path": "adapter", "applies_to": ctx.parent.lineage()}
            adapter = {"method": cfg.method, "r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                       **(adapter_extra or {}), "quant": cfg.quant.model_dump() if cfg.method == "qlora" else None}
        else:
            model.save_pretrained(draft.path / "model", safe_serialization=True)
            artifact, adapter = {"type": "full", "path": "model"}, None
        artifact.update(artifact_extra or {})
        tokenizer.save_pretrained(draft.path / "tokenizer")
        training_curve_png(history, draft.path / "training_curve.png", ctx.entry_name)
        for write in extra_files:
            write(draft.path)
        draft.manifest.update({
            "stage": {"name": ctx.name, "kind": cfg.kind},
            "recipe": recipe_record(ctx.recipe),
            "artifact": artifact,
            "parent": ctx.parent.lineage(),
            "base": base_lineage(ctx),
            "adapter": adapter,
            "tokenizer": {"path": "tokenizer", **tokenizer_facts(tokenizer)},
            "data": {"train": report.as_dict()},
            "config": config_dump,
            "config_hash": hash_json(config_dump),
            "metrics": metrics,
            **({"continues": ctx.continues} if ctx.continues else {}),
            **(manifest_extra or {}),
            "history": history,
            "timings": timings,
            "versions": library_versions(),
        })
    entry = draft.entry
    log.info("registered %s", entry.ref)
    record_finished(ctx, entry)
    return entry
