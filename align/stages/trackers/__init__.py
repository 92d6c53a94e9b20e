"""The trackers a stage logs to besides `metrics.jsonl` (`report`), one module each, behind one interface.

Why it is built this way:
- One interface (`Backend`) for every tracker, so `align.stages.tracker.Tracker` logs each figure once and
  every tracker gets it under the same name, at the same step: the stage code never names a tracker.
- A tracker's package is imported only when a stage reports to it (`open_backend` imports its module,
  which imports the package inside its opener): `report: none` imports none of them.
- A tracker that keeps every point it was sent (W&B, MLflow: `appends_only`) cannot hide the steps an
  interrupted attempt logged after its checkpoint, as TensorBoard's `purge_step` does; the tracker skips
  the steps a resumed run logs again instead (`align.stages.trackers.state`), so each step is logged once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# report name -> (module of its backend here, the package it needs, the extra that installs it)
BACKENDS = {
    "tensorboard": ("align.stages.trackers.tensorboard_events", "tensorboard", "tensorboard"),
    "wandb": ("align.stages.trackers.wandb_run", "wandb", "wandb"),
    "mlflow": ("align.stages.trackers.mlflow_run", "mlflow", "mlflow"),
}


@dataclass
class Hyperparameters:
    """What a fresh tracker run records of its stage run: the resolved stage config, the entry's lineage (name,
    parent and base refs, config and data hashes) and the tracking settings that are set."""

    config: dict
    lineage: dict
    tracking: dict

    def nested(self) -> dict:
        """As one dict: the config's keys, then `lineage` and `tracking` (when any setting is set)."""
        return {**self.config, "lineage": self.lineage, **({"tracking": self.tracking} if self.tracking else {})}

    def flat(self) -> dict:
        """As one level of dotted names (`lr`, `lora.r`, `lineage.config_hash`, `tracking.project`): the names
        every tracker shows them under."""
        return flat(self.nested())


class Backend(Protocol):
    """One tracker's run for one stage run."""

    name: str
    appends_only: bool  # keeps every point sent: a resumed run must not send a step twice

    def start(self, hyperparameters: Hyperparameters) -> None:
        """A fresh run's hyperparameters (`Tracker.log_start`: config, lineage, tracking settings)."""

    def log_scalars(self, step: int, figures: dict[str, float]) -> None:
        """Numbers at a step, under the names every tracker uses."""

    def log_entry(self, ref: str, step: int) -> None:
        """The registered entry's ref."""

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """The entry's PNGs by name (`training_curve`, ...)."""

    def record(self):
        """What the manifest's `tracking` section says of this run (where it is, its ids)."""

    def state(self) -> dict:
        """What `tracking.json` keeps so that a resumed run reopens this run (its id, where it is)."""

    def close(self, failed: bool) -> None:
        """End the run (as failed when the stage raised)."""


def open_backend(name: str, ctx, earlier: dict | None, resumed_step: int | None) -> Backend:
    """Tracker `name`'s run for the stage run `ctx`: the run `earlier` (its `state()` in `tracking.json`) when
    resuming and it is still the same project, else a new one."""
    module = importlib.import_module(BACKENDS[name][0])
    return module.open_run(ctx, earlier, resumed_step)


def flat(value, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys (`lora.r`); other values as they are."""
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numbers(figures: dict) -> dict[str, float]:
    """The figures a tracker plots: the numbers, without `step` (the x-axis)."""
    return {key: value for key, value in figures.items() if key != "step" and is_number(value)}
