"""`align run RECIPE --continue`: a finished run trained on for more steps, from its last checkpoint, with its
optimizer state, data order and schedule position, registered as a new version whose manifest says which
entry it continues (`continues`).

Why: re-running a finished stage with a larger `max_steps` is otherwise a different run (its config changed),
refused or, with `--force`, started afresh: every step trained again, Adam's moments lost.

What may change: only the run's length and its bookkeeping (`LENGTH_KEYS`: max_steps, epochs, the time limit,
how often it logs, evaluates and saves). Anything else (learning rate, data, batch, seed, parent, tokenizer,
processes) would make the steps before and after the checkpoint two different runs, and is refused naming
the keys that changed.

What the schedule does: transformers rebuilds the learning-rate schedule for the new total and restores the
step it had reached, so from the first continued step on, step s gets the rate a run planned for the new
length from the start has at step s (`schedule_callback` sees to the first step, which would otherwise keep
the rate the finished run ended on); the steps already trained keep the rates they had. With `scheduler:
constant` the rate carries on unchanged. With cosine or linear decay (cosine is the default) it is a warm
restart: the finished run had decayed to about 0 at its last step, and the next one jumps back up to the new
curve's value there (cosine, 8 steps continued to 200: from 0 to 0.996 x lr). Warmup is the new total's share
(`warmup_ratio` x the new steps), so a continuation that starts inside it warms up the rest of the way. Adam's
moments and the data order (seeded per epoch) carry on in every case. For a smooth continuation, train with
`scheduler: constant` or `constant_with_warmup`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from align.errors import TrainingError

log = logging.getLogger(__name__)

LENGTH_KEYS = ("max_steps", "epochs", "time_limit_minutes", "save_steps", "logging_steps", "eval_steps",
               "report", "tracking")  # and how the run is watched
CONTINUES_FILE = "continues.json"


def continuation(ctx, fingerprint: dict, settings: dict) -> Path | None:
    """The checkpoint to continue a finished run from, the run folder made ready for it; None when this stage
    has nothing to continue: no finished run in its folder, or a finished run whose length this run does not
    change (the usual finished / resume / refuse / start rules then apply, as without `--continue`). Raises
    when the length changed together with anything else."""
    from align.stages.run_folder import _read_finished, _without_world

    record = _read_finished(ctx.run_dir)
    if record is None or _without_world(record.get("fingerprint")) == _without_world(fingerprint):
        return None
    entry = ctx.registry.find(record.get("entry", ""))
    if entry is None:
        raise TrainingError(f"--continue: {ctx.run_dir} finished as {record.get('entry')}, which is no longer in "
                            f"registry {ctx.registry.root}; there is no entry to continue")
    if not any(k in ("max_steps", "epochs") for k in config_changes(entry.manifest.get("config") or {}, settings)):
        return None  # the length is the same: not a continuation
    refuse_other_changes(ctx, record, entry, fingerprint, settings)
    return start_continuing(ctx, entry, fingerprint, settings)


def refuse_other_changes(ctx, record: dict, entry, fingerprint: dict, settings: dict) -> None:
    """Refuse a continuation that changes more than `LENGTH_KEYS`, naming what changed."""
    from align.stages.run_folder import _without_world

    before, after = _without_world(record.get("fingerprint")) or {}, _without_world(fingerprint)
    parts = [k for k in sorted(before.keys() | after.keys()) if k != "config" and before.get(k) != after.get(k)]
    changes = config_changes(entry.manifest.get("config") or {}, settings)
    keys = [k for k in changes if k.split(".")[0] not in LENGTH_KEYS]
    if parts or keys:
        shown = [f"{k} {json.dumps(changes[k][0], default=str)} -> {json.dumps(changes[k][1], default=str)}"
                 for k in keys] + parts
        raise TrainingError(f"--continue: stages.{ctx.name}: only {', '.join(LENGTH_KEYS)} may change to continue "
                            f"{entry.ref}; changed: {', '.join(shown)}. Without --continue, --force trains afresh.")


def start_continuing(ctx, entry, fingerprint: dict, settings: dict) -> Path:
    """Check there are steps left to train, then record the run as a continuation of `entry`: `run.json` and
    `settings.json` for the new length, `continues.json` for the manifest (`registered.json` stays until the new
    entry replaces it, so a crash leaves the finished run reported as finished)."""
    from align.registry.records import write_json_atomic
    from align.runtime import distributed
    from align.stages.resume import resumed_step, set_aside, write_settings
    from align.stages.run_folder import _check_world_size, latest_checkpoint

    checkpoint = latest_checkpoint(ctx.run_dir, on_damaged=set_aside)
    if checkpoint is None:
        raise TrainingError(f"--continue: {ctx.run_dir} has no complete checkpoint left to continue {entry.ref} from")
    step = resumed_step(checkpoint)
    max_steps = getattr(ctx.config, "max_steps", None)
    if max_steps is not None and max_steps <= step:
        raise TrainingError(f"--continue: stages.{ctx.name}.max_steps {max_steps} is not beyond the {step} steps "
                            f"{entry.ref} trained; set it higher (--set stages.{ctx.name}.max_steps=N)")
    changes = config_changes(entry.manifest.get("config") or {}, settings)
    record = {"entry": entry.ref, "from_step": step, "checkpoint": str(checkpoint),
              "changed": {k: list(v) for k, v in changes.items()}}
    write_json_atomic(ctx.run_dir / CONTINUES_FILE, record)
    write_json_atomic(ctx.run_dir / "run.json", {**fingerprint, "world_size": distributed.world_size()})
    write_settings(ctx.run_dir, settings)
    log.info("stages.%s: continuing %s from step %d (%s): optimizer, data order and schedule position carry on; the "
             "%s schedule is laid over the new length", ctx.name, entry.ref, step, checkpoint.name,
             getattr(ctx.config, "scheduler", "learning-rate"))
    return _check_world_size(checkpoint, distributed.world_size())


def read_continues(run_dir: Path) -> dict | None:
    """What the run in `run_dir` continues (`continues.json`), or None for a run of its own."""
    from align.registry.records import read_json_record

    return read_json_record(run_dir / CONTINUES_FILE)


def config_changes(before: dict, after: dict) -> dict[str, tuple]:
    """{dotted key: (before, after)} for every config value that differs."""
    from align.stages.resume import _flat

    old, new = _flat(before), _flat(after)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def trained_nothing(ctx, resumed_at: int, steps: int) -> None:
    """A continuation whose new length gave no step beyond the checkpoint (`epochs` not raised enough) must not
    register a copy of the entry it continues."""
    if ctx.continues and steps <= resumed_at:
        raise TrainingError(f"--continue: stages.{ctx.name} has no step beyond step {resumed_at} of "
                            f"{ctx.continues['entry']} at this length; raise max_steps or epochs")


def schedule_callback():
    """A `TrainerCallback` that, on a resumed run, sets the learning rate of the first step to the schedule's
    value at the step reached. The optimizer restores the rate its last step left (for a finished cosine run,
    about 0) and the rebuilt schedule takes over only after one step: a continuation would spend its first
    step at the old end's rate. On a plain resume both are the same number and nothing changes."""
    from transformers import TrainerCallback

    class ScheduleAtResume(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            lambdas = getattr(lr_scheduler, "lr_lambdas", None)
            if state.global_step == 0 or optimizer is None or not lambdas:
                return
            step = lr_scheduler.last_epoch
            for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lambdas):
                group["lr"] = base * factor(step)
            lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

    return ScheduleAtResume()
