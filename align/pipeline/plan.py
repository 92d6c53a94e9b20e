"""The dry run: validate a whole pipeline, resolve every model ref and data file, load no weights.

`make_plan` collects every problem of every stage into one `ConfigError`, so a user fixes a recipe in
one pass. Stage parents are either earlier stages of the same recipe (their output does not exist yet,
which is fine) or model refs (which must resolve now).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from align.config.recipe import broken_keys
from align.errors import ConfigError, Problem
from align.models.loading import ModelSource
from align.pipeline.plan_data import check_data
from align.pipeline.plan_eval import check_eval, check_eval_models
from align.pipeline.plan_machine import machine_notes, memory_note, setting_problems
from align.pipeline.plan_models import check_reward_sources, check_template, resolve_ref, stage_parent
from align.registry.store import Registry

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    name: str
    kind: str
    parent: str  # "stage:<name>" for an earlier stage of this recipe, else the resolved ref
    parent_source: ModelSource | None
    output: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Plan:
    recipe: object
    registry: Registry
    base: ModelSource | None
    stages: list[StagePlan]

    def describe(self) -> str:
        from align.runtime.precision import device_facts

        lines = [f"recipe {self.recipe.name} ({self.recipe.source})", f"registry {self.registry.root}",
                 f"base: {self.base.describe() if self.base else '?'}", f"device: {device_facts().describe()}"]
        for i, stage in enumerate(self.stages, start=1):
            parent = stage.parent.replace("stage:", "output of stage ")
            lines.append(f"{i}. {stage.name} [{stage.kind}] from {parent} -> {stage.output}@next")
            lines += [f"     {note}" for note in stage.notes]
            lines += [f"     warning: {warning}" for warning in stage.warnings]
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        return [f"stages.{stage.name}: {w}" for stage in self.stages for w in stage.warnings]


def make_plan(recipe, registry: Registry | None = None, only: list[str] | None = None,
              check_hub: bool = True) -> Plan:
    """Check every stage's parent, files, refs and data (no weights load); one `ConfigError` with every problem.
    A partial recipe (`ConfigError.partial`) is checked too: a check that reads a key that failed validation
    is skipped (`broken_keys`), every other one runs."""
    if registry is None:
        registry = Registry(recipe.registry) if recipe.registry else Registry()
    problems: list[Problem] = []
    base = None if "base" in broken_keys(recipe) else resolve_ref(recipe.base, "base", registry, problems, check_hub)
    names = list(recipe.stages)
    unbuilt = broken_keys(recipe, "stages")
    for name in only or []:
        if name not in recipe.stages and name not in unbuilt:
            problems.append(Problem(f"--stage {name}", f"no such stage; the recipe has {', '.join(names)}"))
    selected = [n for n in names if not only or n in only]
    plans = []
    templates: dict[str, str | None] = {}  # each stage's chat template, for the stages that follow it
    read: dict[str, str | None] = {}  # chat templates of tokenizer folders, read once
    for index, name in enumerate(names):
        cfg = recipe.stages[name]
        where = f"stages.{name}"
        bad = broken_keys(recipe, where)
        if "from" in bad:
            parent, parent_source = "(from: not valid)", None
        else:
            parent, parent_source = stage_parent(recipe, name, index, cfg, selected, base, registry, problems, check_hub)
        if name not in selected:
            continue
        stage = StagePlan(name=name, kind=cfg.kind, parent=parent, parent_source=parent_source,
                          output=f"{recipe.name}/{name}")
        problems += setting_problems(recipe, cfg, where, bad)
        if getattr(cfg, "rewards", None) is not None and not bad & {"rewards", "allow_failed_gate"}:
            stage.notes += check_reward_sources(recipe, name, index, cfg, selected, registry, problems, check_hub)
        for key in ("data", "eval_data", "prompts", "eval_prompts"):
            spec = getattr(cfg, key, None) if key not in bad else None
            if spec is not None:
                stage.notes += check_data(recipe, spec, f"{where}.{key}", cfg, problems, bad)
        if not bad & {"from", "chat_template", "allow_template_mismatch"}:
            check_template(recipe, name, cfg, parent_source, templates, read, registry, problems)
        if not bad:  # notes only; a stage with broken keys fails the plan anyway
            notes, warnings = machine_notes(cfg)
            stage.notes += notes
            stage.warnings += warnings
            stage.notes += memory_note(recipe, cfg, parent_source or base, registry)
        plans.append(stage)
    if "eval" not in broken_keys(recipe):
        check_eval(recipe, problems, broken_keys(recipe, "eval"))
        check_eval_models(recipe, registry, problems, check_hub, broken_keys(recipe, "eval"))
    if problems:
        raise ConfigError(problems, recipe.source)
    return Plan(recipe=recipe, registry=registry, base=base, stages=plans)


def add_plan_problems(err: ConfigError, registry: Registry | None = None, only: list[str] | None = None,
                      check_hub: bool = True) -> ConfigError:
    """`err` (a recipe's schema and cross-field problems) with the plan's problems of the same recipe added,
    from the recipe as far as it validated (`err.partial`): files, refs and data of every stage in the same
    report, instead of only once the schema is clean."""
    if err.partial is None:
        return err
    try:
        make_plan(err.partial, registry, only, check_hub)
        planned: list[Problem] = []
    except ConfigError as found:
        planned = found.problems
    except Exception:  # noqa: BLE001 - a check that trips over a partial recipe must not hide the schema report
        log.debug("planning the partial recipe failed", exc_info=True)
        planned = []
    return ConfigError(list(dict.fromkeys([*err.problems, *planned])), err.source)


# ------------------------------------------------------------------------------------------ tokenizers, memory


