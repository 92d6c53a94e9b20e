"""What every stage shares: its context, the run folder with resumable checkpoints, and the trainer
callbacks that make a run safe to interrupt.

Lifecycle: setup -> train (resumable) -> save -> evaluate -> register. A run folder
`runs/<recipe>/<stage>/` holds checkpoints and `run.json`, the fingerprint of what the run trains
(config, data, parent, seed). A later run with the same fingerprint resumes from the last complete
checkpoint; a different fingerprint is refused unless `--force`, which starts the run afresh.
"""

from __future__ import annotations

import json
import logging
import math
import re
import resource
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from align.errors import TrainingError
from align.models import ModelSource
from align.registry import Registry, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    recipe: object  # align.recipe.Recipe
    name: str
    config: object  # the stage's typed config
    registry: Registry
    parent: ModelSource
    runs_root: Path = Path("runs")
    force: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def entry_name(self) -> str:
        return f"{self.recipe.name}/{self.name}"

    @property
    def run_dir(self) -> Path:
        return self.runs_root / self.recipe.name / self.name


# ------------------------------------------------------------------------------------------ run folder


def prepare_run_dir(run_dir: Path, fingerprint: dict, force: bool) -> Path | None:
    """Create or reuse the run folder; returns the checkpoint to resume from, or None for a fresh start."""
    meta = run_dir / "run.json"
    if meta.is_file():
        previous = json.loads(meta.read_text())
        changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if changed and not force:
            raise TrainingError(
                f"{run_dir} holds a run with different {', '.join(changed)}; resuming it would mix two runs. "
                "Pass --force to discard it and start afresh.")
        if changed:
            log.warning("discarding %s (changed: %s)", run_dir, ", ".join(changed))
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta, fingerprint)
    return latest_checkpoint(run_dir)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (one whose trainer state was written last)."""
    best = None
    for child in run_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and (child / "trainer_state.json").is_file():
            if best is None or int(match.group(1)) > best[0]:
                best = (int(match.group(1)), child)
    return best[1] if best else None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------ callbacks


def safety_callbacks():
    """Callbacks for HF/TRL trainers; the first is the graceful stop (SIGTERM/SIGINT save a checkpoint and stop),
    whose `requested` flag tells the caller the run was interrupted."""
    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        """On SIGTERM or SIGINT, finish the current step, save a checkpoint, and stop."""

        def __init__(self):
            self.requested = False
            self._previous = {}

        def on_train_begin(self, args, state, control, **kwargs):
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

        def _handle(self, signum, frame):
            self.requested = True
            log.warning("signal %s received: saving a checkpoint after this step", signum)

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    return [GracefulStop()]


def check_finite(loss_value: float, step: int) -> None:
    if not math.isfinite(loss_value):
        raise TrainingError(f"loss became {loss_value} at step {step}; stopping before the optimizer step, "
                            "no checkpoint written after it. Lower the learning rate or check the data.")


def training_curve_png(history: list[dict], path: Path, title: str) -> Path | None:
    """Training and eval loss against step, as a PNG beside the entry's manifest."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
