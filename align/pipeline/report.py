"""The cross-stage report: a recipe's base and stage entries evaluated the same way, side by side.

`align report RECIPE` takes the recipe's base and the latest entry of each of its policy stages (SFT, PPO,
DPO, ...), evaluates each on the recipe's eval prompts with one set of settings and metrics, and writes
`<registry>/reports/<recipe>/report.md` and `report.json`, with PNGs: training curves from each entry's
logged history (the manifest's `history`) and the distribution of the judge's scores per entry.

Why the numbers compare:
- One held-out set for perplexity for every entry: `eval.data`, else the held-out split of the recipe's
  first SFT stage (the same examples that stage's hook measured), rebuilt with the same split and seed.
- The same prompts and generation settings for every entry, and one judge (a reward entry: `--reward-model`,
  else `eval.reward_model`, else the latest entry of the recipe's reward stage) for reward and win rate.
- A result is reused only when its fingerprint (settings, data, judge) matches (`align.pipeline.comparison`).
Win rate is against the base (ties count half, identical responses tie, so the base against itself is
exactly 0.5). `align eval` of one entry is `align.pipeline.eval_entry`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from align.errors import AlignError
from align.eval.hook import load_eval_prompts
from align.eval.judges import needs_judge, resolve_eval_ref, source_label
from align.pipeline.comparison import Row, add_win_rates, comparison_settings, default_judge, evaluate_rows, now_utc
from align.pipeline.tables import markdown_table, sample_lines
from align.registry.records import write_json_atomic
from align.registry.store import Registry
from align.stages import stage_class

log = logging.getLogger(__name__)


@dataclass
class Report:
    """A written cross-stage report: what was compared, how, and the files it wrote."""

    recipe: object
    settings: object
    registry: Registry
    rows: list[Row]
    judge: str | None
    folder: Path
    files: list[Path] = field(default_factory=list)


def recipe_entries(recipe, registry: Registry) -> list[tuple[str, object]]:
    """(label, source): the base, then the latest entry of each policy stage that has one, in recipe order."""
    sources = [("base", resolve_eval_ref(recipe, "base", registry))]
    for name, cfg in recipe.stages.items():
        if stage_class(cfg.kind).entry_kind == "reward":
            continue
        source = resolve_eval_ref(recipe, name, registry)
        if source is None:
            log.info("stage %s has no entry in %s; left out of the report", name, registry.root)
            continue
        sources.append((name, source))
    return sources


def build_report(recipe, registry: Registry, *, metrics: list[str] | None = None, limit: int | None = None,
                 generation: dict | None = None, reward_model: str | None = None, out: str | Path | None = None) -> Report:
    """Evaluate the recipe's base and stage entries on one set of prompts and metrics; write the report."""
    if recipe.eval.prompts is None:
        raise AlignError(f"{recipe.name}: the report generates from `eval.prompts`; the recipe has none")
    judge_source = default_judge(recipe, registry, reward_model)
    if judge_source is None:
        log.warning("no reward entry to judge with (set eval.reward_model or --reward-model, or run the recipe's "
                    "reward stage): reward and win rate are left out")
    settings = comparison_settings(recipe.eval, metrics=metrics, limit=limit, generation=generation,
                                   judged=judge_source is not None, judge_given=bool(reward_model))
    rows = evaluate_rows(recipe, settings, registry, recipe_entries(recipe, registry), judge_source)
    add_win_rates(rows, rows[0])
    folder = Path(out) if out else registry.root / "reports" / recipe.name
    report = Report(recipe=recipe, settings=settings, registry=registry, rows=rows, folder=folder,
                    judge=source_label(judge_source) if judge_source is not None and needs_judge(settings) else None)
    write_report(report)
    return report


def write_report(report: Report) -> list[Path]:
    from align.eval.plots import history_curves_png, score_distributions_png

    folder = report.folder
    folder.mkdir(parents=True, exist_ok=True)
    recipe, settings, rows = report.recipe, report.settings, report.rows
    files = []
    curves = history_curves_png({r.label: r.history for r in rows}, folder / "training_curves.png",
                                f"{recipe.name}: training curves")
    scores = {r.label: r.reward_scores for r in rows if r.reward_scores}
    dist = score_distributions_png(scores, folder / "reward_distribution.png",
                                   f"{recipe.name}: reward of responses to {len(next(iter(scores.values())))} prompts"
                                   f" (judge {report.judge})") if scores else None
    files += [p for p in (curves, dist) if p is not None]

    generation = settings.generation
    decoding = ("greedy decoding" if not generation.temperature else f"sampling at temperature {generation.temperature}")
    if generation.num_beams > 1:
        decoding = f"beam search ({generation.num_beams} beams)"
    count = len(load_eval_prompts(recipe.model_copy(update={"eval": settings}))[0])
    lines = [f"# {recipe.name}: cross-stage report", "",
             f"Recipe `{recipe.source}`, registry `{report.registry.root}`, written {now_utc()}.", "",
             f"Every entry answered the same {count} prompts (`{settings.prompts.path}`) with {decoding}, at most "
             f"{generation.max_new_tokens} new tokens; perplexity on {_loss_description(recipe)}."
             + (f" Reward and win rate judged by `{report.judge}`; win rate against the base, ties count half."
                if report.judge else "")
             + " Speed: one request at a time (first token ms = prefill and first step)."
             + f" Metrics: {', '.join(settings.metrics)}.", "",
             markdown_table(rows, list(settings.checkers)), "",
             "Where the numbers come from: " + "; ".join(
                 f"{r.label} {'evaluated now' if r.origin == 'evaluated' else 'reused (fingerprint ' + str(r.fingerprint) + ', ' + r.origin + ')'}"
                 for r in rows) + ".", ""]
    for path in files:
        lines += [f"![{path.stem.replace('_', ' ')}]({path.name})", ""]
    samples = sample_lines(rows)
    if samples:
        lines += ["## Samples", "", *samples]
    (folder / "report.md.tmp").write_text("\n".join(lines))
    (folder / "report.md.tmp").replace(folder / "report.md")
    data = {"recipe": recipe.name, "source": recipe.source, "created": now_utc(), "registry": str(report.registry.root),
            "settings": settings.model_dump(), "judge": report.judge, "against": rows[0].ref,
            "rows": [r.as_dict() for r in rows], "plots": [p.name for p in files]}
    write_json_atomic(folder / "report.json", data)
    report.files = [folder / "report.md", folder / "report.json", *files]
    return report.files


def _loss_description(recipe) -> str:
    if recipe.eval.data is not None:
        return f"`{recipe.eval.data.path}`"
    sft = next((n for n, cfg in recipe.stages.items() if stage_class(cfg.kind).data_kind == "conversations"),
               None)
    return f"the held-out split of stage {sft}" if sft else "nothing (no eval.data and no SFT stage)"
