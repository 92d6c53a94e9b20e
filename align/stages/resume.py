"""What resuming a run must get right, beyond the checkpoint Trainer restores: which checkpoint is whole,
which recipe keys changed when a resume is refused, the training loss over the whole run, and the space a
checkpoint needs (for a full disk's message).

Why each exists:
- A checkpoint whose `trainer_state.json` is complete can still hold a truncated `adapter_model.safetensors`
  or `optimizer.pt` (a disk error, a copy cut short); resuming it crashed inside torch or safetensors. Such a
  checkpoint is passed over for the previous whole one and moved to `damaged/`, its problem named.
- "different config" did not say which key changed: the run folder keeps the config values too
  (`settings.json`), so the refusal names each changed key with both values.
- Trainer's `training_loss` averages only the steps trained by this process: a resumed run recorded the
  mean of its last steps, and 0.0 when it resumed from the final checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from align.registry.integrity import folder_problems

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
DAMAGED_DIR = "damaged"


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_problems(checkpoint: Path) -> list[str]:
    """Damaged files of a complete checkpoint (truncated safetensors, torch archives or JSON), [] if whole."""
    return folder_problems(checkpoint)


def set_aside(checkpoint: Path, problems: list[str]) -> Path:
    """Move a damaged checkpoint to `<run>/damaged/` (kept for inspection, out of every `checkpoint-*` glob so
    neither resume nor the Trainer's rotation sees it) and say why."""
    folder = checkpoint.parent / DAMAGED_DIR
    folder.mkdir(exist_ok=True)
    target, n = folder / checkpoint.name, 1
    while target.exists():
        n += 1
        target = folder / f"{checkpoint.name}.{n}"
    checkpoint.rename(target)
    log.warning("%s is damaged (%s); resuming from the previous whole checkpoint instead; moved it to %s",
                checkpoint, "; ".join(problems), target)
    return target


# ------------------------------------------------------------------------------------------ settings


def write_settings(run_dir: Path, settings: dict | None) -> None:
    """Keep the run's config values beside its fingerprint, to name what changed on a refused resume."""
    from align.registry.records import write_json_atomic

    if settings is not None:
        write_json_atomic(run_dir / SETTINGS_FILE, settings)


def changed_settings(run_dir: Path, settings: dict | None, limit: int = 6) -> str:
    """`lr 0.01 -> 0.001, lora.r 8 -> 16`: the config keys that differ from the recorded run's, or "" when
    either side was not recorded."""
    try:
        before = json.loads((run_dir / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return ""
    if settings is None:
        return ""
    old, new = _flat(before), _flat(settings)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    shown = [f"{k} {json.dumps(old.get(k, '<unset>'), default=str)} -> {json.dumps(new.get(k, '<unset>'), default=str)}"
             for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


# ------------------------------------------------------------------------------------------ loss


def whole_run_loss(log_history: list[dict], resumed_at: int, steps: int, this_run_loss: float) -> float:
    """The mean training loss over every step of the run. Steps up to `resumed_at` come from the logged
    losses restored with the checkpoint (each log averages the steps since the one before; the stages log
    at every save, so they cover the checkpoint's steps exactly); steps after it from Trainer's own mean for
    this process (`this_run_loss`, over `steps - resumed_at` steps)."""
    if resumed_at <= 0:
        return this_run_loss
    total, covered, previous = 0.0, 0, 0
    for step, loss in sorted({h["step"]: h["loss"] for h in log_history
                              if "loss" in h and 0 < h.get("step", 0) <= resumed_at}.items()):
        total, covered, previous = total + loss * (step - previous), covered + step - previous, step
    trained = max(steps - resumed_at, 0)
    total += this_run_loss * trained
    return total / (covered + trained) if covered + trained else this_run_loss


def resumed_step(checkpoint: Path | None) -> int:
    """The step a checkpoint holds (0 for a fresh start)."""
    if checkpoint is None:
        return 0
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# ------------------------------------------------------------------------------------------ space


def checkpoint_bytes(run_dir: Path, model) -> int | None:
    """What one more checkpoint of this run takes: the newest complete one's size, else an estimate from the
    model (the weights a checkpoint saves, plus Adam's two fp32 moments per trainable parameter)."""
    sizes = [sum(f.stat().st_size for f in c.rglob("*") if f.is_file())
             for c in run_dir.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    if sizes:
        return max(sizes)
    if model is None:
        return None
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    saved = trainable if hasattr(model, "peft_config") else params
    return sum(p.numel() * p.element_size() for p in saved) + sum(p.numel() * 8 for p in trainable)


def free_space_hint(run_dir: Path) -> str:
    """What is safe after a failed save, for the full disk's message."""
    from align.stages.run_folder import latest_checkpoint

    latest = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    kept = f"the last complete checkpoint, {latest.name}, is intact and resumes" if latest else \
        "no complete checkpoint was written yet"
    return f"Nothing complete was lost: {kept}; the registry is untouched."
