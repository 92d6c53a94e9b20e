"""Running a recipe: plan it (all checks, no weights), then run its stages in order.

A stage's parent is resolved when the stage starts: an earlier stage of this run hands over the entry it
just registered, so stages chain through the registry by ref, never by a copied path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from align.eval.hook import evaluation_registry
from align.models.loading import ModelSource
from align.pipeline.plan import make_plan
from align.registry.store import Entry, Registry
from align.stages import stage_class
from align.stages.context import StageContext

log = logging.getLogger(__name__)


def run_recipe(recipe, registry: Registry | None = None, only: list[str] | None = None,
               force: bool = False, runs_root: Path = Path("runs"), continue_run: bool = False) -> dict[str, Entry]:
    """Run the recipe's stages (`only`: these); each logs into its run folder's `log.txt` (`align.pipeline.runlog`).
    `continue_run`: a finished stage whose length grew trains on from its last checkpoint
    (`align.stages.continuing`)."""
    from align.pipeline.runlog import stage_log

    plan = make_plan(recipe, registry, only)
    for warning in plan.warnings():
        log.warning("%s", warning)
    produced: dict[str, Entry] = {}
    for stage in plan.stages:
        if stage.parent.startswith("stage:"):
            entry = produced[stage.parent[len("stage:"):]]
            parent = ModelSource(ref=entry.ref, kind="registry", entry=entry)
        else:
            parent = stage.parent_source
        ctx = StageContext(recipe=recipe, name=stage.name, config=recipe.stages[stage.name], registry=plan.registry,
                           parent=parent, runs_root=runs_root, force=force, continue_run=continue_run)
        runner = stage_class(stage.kind)(ctx)
        with stage_log(ctx.run_dir, stage.name):
            log.info("stage %s [%s] from %s", stage.name, stage.kind, parent.describe())
            with evaluation_registry(plan.registry):  # the hook resolves eval.reward_model / eval.against here
                produced[stage.name] = runner.run()
    return produced
