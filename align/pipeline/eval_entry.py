"""`align eval REF [--against REF ...]`: one entry (and its opponents) evaluated the same way, on the eval
settings of `--recipe`, else of the recipe its manifest records (from any folder), else defaults over
`--prompts`; printed as a table or written as JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from align.errors import AlignError
from align.eval.metrics import win_rate
from align.pipeline.comparison import Row, comparison_settings, default_judge, evaluate_rows
from align.pipeline.tables import markdown_table, sample_lines
from align.registry.store import Registry

log = logging.getLogger(__name__)


def eval_recipe(source, recipe_path: str | None, overrides: list[str], prompts: str | None):
    """Whose eval settings `align eval` uses: `--recipe`, else the recipe recorded in the entry's manifest
    (`recorded_recipe`, from any folder), else defaults over `--prompts`."""
    from align.config.loading import load_recipe
    from align.config.schema import DataSpec
    from align.config.recipe import Defaults, EvalSettings, Recipe

    recipe = None
    if recipe_path:
        recipe = load_recipe(recipe_path, overrides)
    elif source.entry is not None:
        recipe = recorded_recipe(source.entry, overrides)
    if recipe is None:
        if not prompts:
            raise AlignError(f"no eval settings for {source.ref}: give --recipe RECIPE (its eval section) or "
                             "--prompts FILE")
        recipe = Recipe.model_construct(name="eval", base=source.ref, registry=None, defaults=Defaults(), stages={},
                                        eval=EvalSettings(prompts=DataSpec(path=prompts)), source=None)
    elif prompts:
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"prompts": DataSpec(path=prompts)})})
    return recipe


def recorded_recipe(entry, overrides: list[str]):
    """The recipe `entry`'s manifest records, with the eval settings its run used (data paths absolute), or
    None when it records neither. The file is found by its absolute path, its relative paths from the folder
    the run started in, so the working directory does not matter; once the file is gone, the recorded eval
    settings alone serve (no stages: perplexity then needs `eval.data`)."""
    from align.config.loading import read_recipe_file, validate_recipe

    record = entry.manifest.get("recipe") or {}
    stored = record.get("eval")
    path = next((p for p in (record.get("path"), record.get("source")) if p and Path(p).is_file()), None)
    if path is not None:
        log.info("eval settings of the recipe %s (from %s's manifest)", path, entry.ref)
        raw = read_recipe_file(Path(path))
        if stored is not None and isinstance(raw, dict):
            raw = {**raw, "eval": stored}
        return validate_recipe(raw, overrides, source=path, workdir=record.get("workdir"))
    if stored is None:
        return None
    log.info("eval settings recorded in %s's manifest (its recipe %s is gone)", entry.ref, record.get("source"))
    return _eval_only_recipe(entry, record, stored, overrides)


def _eval_only_recipe(entry, record: dict, stored: dict, overrides: list[str]):
    """A recipe with no stages around the eval settings `stored` (with `eval.*` overrides applied)."""
    from pydantic import ValidationError

    from align.errors import ConfigError, Problem
    from align.config.loading import apply_overrides
    from align.config.recipe import Defaults, EvalSettings, Recipe

    problems: list = []
    raw = apply_overrides({"eval": stored}, overrides, problems)
    try:
        settings = EvalSettings.model_validate(raw["eval"])
    except ValidationError as err:
        problems += [Problem(".".join(map(str, ("eval", *e["loc"]))), e["msg"]) for e in err.errors()]
    if problems:
        raise ConfigError(problems, f"{entry.ref}'s recorded eval settings")
    base = entry.manifest.get("base") or {}
    return Recipe.model_construct(name=record.get("name") or "eval", base=base.get("ref") or base.get("id") or
                                  base.get("path") or entry.ref, registry=None, defaults=Defaults(), stages={},
                                  eval=settings, source=None, workdir=record.get("workdir"))


def run_eval(ref: str, registry: Registry, *, against: list[str] = (), recipe_path: str | None = None,
             overrides: list[str] = (), prompts: str | None = None, metrics: list[str] | None = None,
             limit: int | None = None, generation: dict | None = None, reward_model: str | None = None) -> tuple[list[Row], object]:
    """`align eval REF [--against REF ...]`: REF and each opponent evaluated the same way; REF's win rate
    against each opponent (judged by the reward entry) is added to REF's row as `win_rate_vs`."""
    from align.models.loading import materialize, resolve_model_ref

    source = materialize(resolve_model_ref(ref, registry), registry)
    opponents = [materialize(resolve_model_ref(r, registry), registry) for r in against]
    for name, s in [(ref, source), *zip(against, opponents)]:
        refuse_reward_entry(name, s)
    recipe = eval_recipe(source, recipe_path, list(overrides), prompts)
    judge_source = default_judge(recipe, registry, reward_model)
    if against and judge_source is None:
        raise AlignError("win rate needs a judge: give --reward-model REF (a reward entry), or set eval.reward_model or eval.judge")
    settings = comparison_settings(recipe.eval, metrics=metrics, limit=limit, generation=generation,
                                   judged=judge_source is not None, judge_given=bool(reward_model))
    sources = [(ref, source)] + [(r, s) for r, s in zip(against, opponents)]
    rows = evaluate_rows(recipe, settings, registry, sources, judge_source)
    main = rows[0]
    main.metrics["win_rate_vs"] = {}
    for row in rows[1:]:
        if main.reward_scores is not None and row.reward_scores is not None:
            same = [a == b for a, b in zip(main.response_hashes or [], row.response_hashes or [])]
            main.metrics["win_rate_vs"][row.ref] = win_rate(main.reward_scores, row.reward_scores, same or None)
    return rows, settings


def refuse_reward_entry(ref: str, source) -> None:
    """A reward entry scores; it does not answer: `align eval` and `align chat` refuse it."""
    if source.entry is not None and source.entry.kind == "reward":
        raise AlignError(f"{ref} is a reward model, not a policy that answers; score responses with it: "
                         f"align score {ref} --data FILE, or judge with --reward-model {ref}")


def format_eval(rows: list[Row], settings) -> str:
    """What `align eval` prints: the table, the win rates, which results were reused, the samples."""
    lines = [markdown_table(rows, list(settings.checkers), against=rows[0].ref), ""]
    for ref, result in (rows[0].metrics.get("win_rate_vs") or {}).items():
        lines.append(f"win rate of {rows[0].ref} against {ref}: {result['win_rate']:.3f} "
                     f"({result['win_rate_wins']} wins, {result['win_rate_ties']} ties, "
                     f"{result['win_rate_losses']} losses)")
    for row in rows:
        if row.origin != "evaluated":
            lines.append(f"{row.ref}: reused evaluation {row.fingerprint} ({row.origin})")
    samples = sample_lines(rows)  # the `samples` metric has no column: shown here, not only in --json
    if samples:
        lines += ["", "samples:", "", *samples]
    return "\n".join(lines).rstrip()


def rows_json(rows: list[Row], settings) -> str:
    """`align eval --json`: the settings and every row."""
    return json.dumps({"settings": settings.model_dump(), "rows": [r.as_dict() for r in rows]}, indent=2,
                      default=str)
