"""What a stage runs with: the recipe, its config, the registry, its parent, its run folder and its clock."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from align.models.loading import ModelSource
from align.registry.store import Registry
from align.stages.budget import StageBudget
from align.stages.tracker import Tracker


@dataclass
class StageContext:
    recipe: object  # align.config.recipe.Recipe
    name: str
    config: object  # the stage's typed config
    registry: Registry
    parent: ModelSource
    runs_root: Path = Path("runs")
    force: bool = False
    continue_run: bool = False  # `--continue`: train a finished run on for more steps (`align.stages.continuing`)
    started: float = field(default_factory=time.monotonic)  # the stage's clock, from its first line
    continues: dict | None = None  # set when this run continues a finished entry (`align.stages.continuing`)
    # Where the run logs its figures (`align.stages.tracker`): metrics.jsonl and any tracker `report` names;
    # a disabled one until the run starts training.
    tracker: Tracker = field(default_factory=Tracker, repr=False)
    _budget: StageBudget | None = field(default=None, repr=False)

    @property
    def budget(self) -> StageBudget:
        """The stage's end-to-end time budget (`time_limit_minutes`, counted from `started`)."""
        if self._budget is None:
            self._budget = StageBudget(getattr(self.config, "time_limit_minutes", None), started=self.started)
        return self._budget

    @property
    def entry_name(self) -> str:
        return f"{self.recipe.name}/{self.name}"

    @property
    def run_dir(self) -> Path:
        return self.runs_root / self.recipe.name / self.name
