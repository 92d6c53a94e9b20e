"""A stage's run folder `runs/<recipe>/<stage>/`: its fingerprint, resumable checkpoints, and the record of
the entry it registered.

`run.json` holds the fingerprint of what the run trains (config, data, parent, seed, processes). A later run
with the same fingerprint resumes from the last complete checkpoint; a different fingerprint is refused unless
`--force`, which starts afresh. Once the stage has registered its entry, `registered.json` names it: a later
run of the same stage is finished already and reports that entry (unless `--force`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from align.errors import TrainingError
from align.registry.records import read_json_record, write_json_atomic
from align.registry.store import Entry
from align.stages.context import StageContext
from align.stages.resume import changed_settings, checkpoint_problems, set_aside, write_settings

log = logging.getLogger(__name__)


def prepare_run_dir(run_dir: Path, fingerprint: dict, force: bool, settings: dict | None = None) -> Path | None:
    """Create or reuse the run folder; returns the checkpoint to resume from, or None for a fresh start.
    The fingerprint records the number of processes (`world_size`): checkpoints hold per-process state and
    batch shards, so a run resumes only under as many processes as it started with. `settings` (the stage's
    config values) are kept beside it, so a refused resume names the config keys that changed. Only the main
    process reads and writes the folder; the others wait and get its answer."""
    from align.runtime import distributed

    fingerprint = {**fingerprint, "world_size": distributed.world_size()}
    return distributed.on_main(lambda: _prepare_run_dir(run_dir, fingerprint, force, settings))


def _prepare_run_dir(run_dir: Path, fingerprint: dict, force: bool, settings: dict | None = None) -> Path | None:
    meta = run_dir / "run.json"
    if meta.is_file():
        previous = {"world_size": 1, **json.loads(meta.read_text())}  # folders from before it was recorded
        if previous["world_size"] != fingerprint["world_size"] and not force:
            raise TrainingError(
                f"{run_dir} holds a run started with {previous['world_size']} process(es); its checkpoints resume "
                f"only under the same number, and this run has {fingerprint['world_size']}. Run with --nproc "
                f"{previous['world_size']}, or pass --force to discard it and start afresh.")
        # A part the folder did not record (it predates that part) is not compared: the config hash covers it.
        changed = sorted(k for k in previous if previous.get(k) != fingerprint.get(k))
        keys = changed_settings(run_dir, settings) if "config" in changed else ""
        detail = f" (config: {keys})" if keys else ""
        if changed and not force:
            raise TrainingError(
                f"{run_dir} holds a run with different {', '.join(changed)}{detail}; resuming it would mix two "
                "runs. Pass --force to discard it and start afresh.")
        if changed:
            log.warning("discarding %s (changed: %s%s)", run_dir, ", ".join(changed), detail)
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta, fingerprint)
    write_settings(run_dir, settings)
    return _check_world_size(latest_checkpoint(run_dir, on_damaged=set_aside), fingerprint["world_size"])


FINISHED_FILE = "registered.json"


def open_run(ctx: StageContext, fingerprint: dict) -> tuple[Entry | None, Path | None]:
    """(entry, None) when this very run finished already: its folder recorded the entry it registered, which
    is still in the registry. Re-running it would resume from its last checkpoint, train past its end and
    register a copy, so the stage reports that entry instead. Otherwise (None, checkpoint to resume or None),
    the folder prepared by `prepare_run_dir`; a finished run trains again from the start under `--force`, or
    when its entry is gone from the registry."""
    from align.runtime import distributed

    ref = distributed.on_main(lambda: _finished_ref(ctx, fingerprint))
    if ref is not None:
        entry = ctx.registry.resolve(ref)
        log.info("stages.%s finished already: %s registered %s (config %s); nothing to train (--force trains it "
                 "again)", ctx.name, ctx.run_dir, entry.ref, entry.manifest.get("config_hash"))
        return entry, None
    from align.stages.continuing import continuation, read_continues

    settings = ctx.config.model_dump(by_alias=True)
    checkpoint = distributed.on_main(lambda: continuation(ctx, fingerprint, settings)) if ctx.continue_run else None
    if checkpoint is None:
        checkpoint = prepare_run_dir(ctx.run_dir, fingerprint, ctx.force, settings=settings)
    continues = distributed.on_main(lambda: read_continues(ctx.run_dir))  # also when resuming a continuation
    if continues is not None:
        ctx.continues = continues
    return None, checkpoint


def _finished_ref(ctx: StageContext, fingerprint: dict) -> str | None:
    """The ref a finished run of this fingerprint registered; a finished folder that is to train again is
    discarded here. A folder of another fingerprint is left to `prepare_run_dir` (refused, or `--force`)."""
    record = _read_finished(ctx.run_dir)
    if record is None or _without_world(record.get("fingerprint")) != _without_world(fingerprint):
        return None
    entry = ctx.registry.find(record.get("entry", ""))
    if entry is not None and entry.manifest.get("config_hash") == record.get("config_hash") and not ctx.force:
        return entry.ref
    why = "--force" if ctx.force else f"its entry {record.get('entry')} is no longer in registry {ctx.registry.root}"
    log.warning("stages.%s: %s finished before; training it again from the start (%s)", ctx.name, ctx.run_dir, why)
    shutil.rmtree(ctx.run_dir)
    return None


def _read_finished(run_dir: Path) -> dict | None:
    return read_json_record(run_dir / FINISHED_FILE)


def _without_world(fingerprint) -> dict | None:
    """A fingerprint without its process count: a finished run is finished under any number of processes."""
    return {k: v for k, v in fingerprint.items() if k != "world_size"} if isinstance(fingerprint, dict) else None


def record_finished(ctx: StageContext, entry: Entry) -> None:
    """Write `registered.json`: the entry this run registered, its config hash and the run's fingerprint."""
    meta = ctx.run_dir / "run.json"
    fingerprint = json.loads(meta.read_text()) if meta.is_file() else None
    record = {"entry": entry.ref, "config_hash": entry.manifest.get("config_hash"), "fingerprint": fingerprint}
    write_json_atomic(ctx.run_dir / FINISHED_FILE, record)


def latest_checkpoint(run_dir: Path, on_damaged=None) -> Path | None:
    """The newest complete checkpoint whose files are whole. Complete means its `trainer_state.json` parses and
    names its own step: transformers' `Trainer._save_checkpoint` writes that file after the weights, optimizer,
    scheduler and RNG states (PPO writes its checkpoints whole under a hidden name and renames them), so a
    save that crashed midway leaves either no such file or a truncated one, and that folder is passed over.
    Whole means its safetensors, torch and JSON files are not truncated (`align.registry.integrity`): a complete
    checkpoint damaged later is passed over too, for the one before it; `on_damaged(checkpoint, problems)` is
    told (default: a warning naming the files)."""
    found = [(int(m.group(1)), c) for c in run_dir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", c.name))]
    for step, child in sorted(found, reverse=True):
        if not _complete(child, step):
            continue
        problems = checkpoint_problems(child)
        if not problems:
            return child
        if on_damaged is not None:
            on_damaged(child, problems)
        else:
            log.warning("%s is damaged (%s); passing over it", child, "; ".join(problems))
    return None


def _complete(checkpoint: Path, step: int) -> bool:
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        state = None
    complete = isinstance(state, dict) and state.get("global_step") == step
    if not complete:
        log.warning("%s is incomplete (a save was interrupted); passing over it", checkpoint)
    return complete


WORLD_FILE = "world.json"


def record_world_size(checkpoint: Path, world_size: int) -> None:
    """Write the number of processes into a checkpoint folder: its optimizer, RNG and data-order state are
    per process, so `prepare_run_dir` refuses to resume it under another number."""
    if checkpoint.is_dir():
        write_json_atomic(checkpoint / WORLD_FILE, {"world_size": world_size})


def _check_world_size(checkpoint: Path | None, world_size: int) -> Path | None:
    if checkpoint is not None and (checkpoint / WORLD_FILE).is_file():
        saved = json.loads((checkpoint / WORLD_FILE).read_text())["world_size"]
        if saved != world_size:
            raise TrainingError(f"{checkpoint} was written by {saved} process(es) and cannot resume under "
                                f"{world_size}: run with --nproc {saved}, or pass --force to start afresh.")
    return checkpoint
