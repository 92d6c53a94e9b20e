"""The cross-stage report, and `align eval`: entries evaluated the same way, side by side.

`align report RECIPE` takes the recipe's base and the latest entry of each of its policy stages (SFT, PPO,
DPO, ...), evaluates each on the recipe's eval prompts with one set of settings and metrics, and writes
`<registry>/reports/<recipe>/report.md` and `report.json`, with PNGs: training curves from each entry's
logged history (the manifest's `history`) and the distribution of the judge's scores per entry.

Why the numbers compare:
- One held-out set for perplexity for every entry: `eval.data`, else the held-out split of the recipe's
  first SFT stage (the same examples that stage's hook measured), rebuilt with the same split and seed.
- The same prompts and generation settings for every entry, and one judge (a reward entry: `--reward-model`,
  else `eval.reward_model`, else the latest entry of the recipe's reward stage) for reward and win rate.
- A result is reused only when its fingerprint (settings, data, judge) matches: the manifest's own hook
  metrics where no per-prompt data is needed, else an earlier evaluation kept in the manifest under
  `evaluations` (numbers, per-prompt scores and response hashes; no weights are loaded then).
Win rate is computed here from the per-prompt scores, against the base (ties count half, identical
responses tie, so the base against itself is exactly 0.5).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from align.errors import AlignError
from align.eval.hook import (eval_fingerprint, load_eval_prompts, load_judge, needs_judge, resolve_eval_ref,
                            response_hash, run_metrics, source_label, win_rate)
from align.registry.fingerprint import hash_json
from align.registry.store import Registry, write_json_atomic

log = logging.getLogger(__name__)
EXTRA_METRICS = ("reward", "win_rate", "length", "repetition", "speed")
JUDGED = ("reward", "win_rate")


@dataclass
class Row:
    """One evaluated model: its label in the table, what it is, its metrics and per-prompt judge scores."""

    label: str
    source: object  # align.models.loading.ModelSource
    metrics: dict = field(default_factory=dict)
    reward_scores: list[float] | None = None
    response_hashes: list[str] | None = None
    fingerprint: str | None = None
    origin: str = "evaluated"  # evaluated | manifest (the hook's metrics) | cached (an earlier evaluation)

    @property
    def ref(self) -> str:
        return source_label(self.source)

    @property
    def history(self) -> list[dict]:
        entry = self.source.entry
        return (entry.manifest.get("history") if entry is not None else None) or []

    def as_dict(self) -> dict:
        return {"label": self.label, "ref": self.ref, "kind": self.source.entry.kind if self.source.entry else
                self.source.kind, "origin": self.origin, "fingerprint": self.fingerprint, "metrics": self.metrics,
                "reward_scores": self.reward_scores}


# ------------------------------------------------------------------------------------------ settings


def comparison_settings(settings, *, metrics: list[str] | None = None, limit: int | None = None,
                        generation: dict | None = None, judged: bool = True):
    """The eval settings for a comparison: the recipe's, with its metrics plus reward, win rate, length,
    repetition and speed (reward and win rate only with a judge) unless `metrics` names them, and with the
    `generation` overrides (command-line flags) applied."""
    from align.eval.hook import METRICS
    from align.models.generation import settings_with
    from align.config.recipe import EvalSettings

    if metrics:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise AlignError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
        if not judged and any(m in JUDGED for m in metrics):
            raise AlignError("metrics reward and win_rate need a judge: give --reward-model REF (a reward entry)")
        chosen = list(metrics)
    else:
        chosen = list(dict.fromkeys([*settings.metrics, *EXTRA_METRICS]))
        if not judged:
            chosen = [m for m in chosen if m not in JUDGED]
    update = {"metrics": chosen}
    if limit is not None:
        update["limit"] = limit
    if generation:
        update["generation"] = settings_with(settings.generation, generation).model_dump()
    return EvalSettings.model_validate({**settings.model_dump(), **update})


def default_judge(recipe, registry: Registry, explicit: str | None = None):
    """The reward entry that judges: `explicit`, else `eval.reward_model`, else the recipe's latest reward stage
    entry; None when there is none."""
    if explicit:
        source = resolve_eval_ref(recipe, explicit, registry)
        if source is None:
            raise AlignError(f"{explicit}: stage of {recipe.name} with no registry entry yet")
        return source
    if recipe.eval.reward_model:
        return resolve_eval_ref(recipe, recipe.eval.reward_model, registry)
    for name in reversed(list(recipe.stages)):
        if recipe.stages[name].kind == "reward":
            source = resolve_eval_ref(recipe, name, registry)
            if source is not None:
                return source
    return None


def heldout_loss(recipe, tokenizer) -> tuple[list, str | None]:
    """The examples perplexity is measured on, with their fingerprint (as the stage hook computes it):
    `eval.data`, else the first SFT stage's held-out split, else none."""
    from align.data.prepare import load_demonstrations, tokenize_all

    if recipe.eval.data is not None:
        conversations, report = load_demonstrations(recipe, recipe.eval.data)
        data = tokenize_all(tokenizer, conversations.rows, 4096, True, report, str(recipe.eval.data.path),
                            conversations.kept_index)
        return data, report.fingerprint
    sft = next((cfg for cfg in recipe.stages.values() if cfg.kind == "sft"), None)
    if sft is None:
        return [], None
    from align.stages.sft import prepare_data

    _, heldout, _ = prepare_data(SimpleNamespace(config=sft, recipe=recipe), tokenizer)
    return heldout, hash_json([e.input_ids for e in heldout]) if heldout else None


# ------------------------------------------------------------------------------------------ evaluating


def evaluate_rows(recipe, settings, registry: Registry, sources: list[tuple[str, object]], judge_source=None,
                  save: bool = True) -> list[Row]:
    """Evaluate each (label, source) with `settings` on the recipe's prompts and held-out set, reusing results
    whose fingerprint matches; new results are kept in the entry's manifest (`evaluations`) when `save`."""
    from align.models.loading import load_causal_lm, load_tokenizer

    recipe = recipe.model_copy(update={"eval": settings})
    prompt_rows, prompts_fp = load_eval_prompts(recipe)
    judged = judge_source is not None and needs_judge(settings) and bool(prompt_rows)
    extra = {"reward_model": source_label(judge_source)} if judged else {}
    rows = []
    for label, source in sources:
        tokenizer = load_tokenizer(source, registry)
        loss_data, loss_fp = heldout_loss(recipe, tokenizer)
        row = Row(label=label, source=source, fingerprint=eval_fingerprint(settings, loss_fp, prompts_fp, extra))
        if _reuse(row, settings, judged):
            log.info("%s (%s): reusing the evaluation with fingerprint %s (%s)", label, row.ref, row.fingerprint,
                     row.origin)
            rows.append(row)
            continue
        log.info("%s (%s): evaluating on %d prompts", label, row.ref, len(prompt_rows))
        model = load_causal_lm(source, registry)
        model.eval()
        judge = load_judge(judge_source, registry, settings.batch_size) if judged else None
        metrics, ctx = run_metrics(model, tokenizer, settings, prompt_rows, loss_data, judge)
        metrics["eval_fingerprint"] = row.fingerprint
        row.metrics = metrics
        if judged:
            row.reward_scores = list(ctx.reward_scores)
            row.response_hashes = [response_hash(g) for g in ctx.generations]
        del model, ctx
        gc.collect()
        if save and source.entry is not None:
            record = {"created": _now(), "metrics": metrics, "reward_scores": row.reward_scores,
                      "response_hashes": row.response_hashes}
            registry.update(source.entry, evaluations={row.fingerprint: record})
        rows.append(row)
    return rows


def _reuse(row: Row, settings, judged: bool) -> bool:
    entry = row.source.entry
    if entry is None:
        return False
    record = (entry.manifest.get("evaluations") or {}).get(row.fingerprint)
    if record is not None:
        row.metrics, row.origin = dict(record["metrics"]), "cached"
        row.reward_scores, row.response_hashes = record.get("reward_scores"), record.get("response_hashes")
        return True
    metrics = entry.manifest.get("metrics") or {}
    if metrics.get("eval_fingerprint") == row.fingerprint and not judged:
        row.metrics, row.origin = dict(metrics), "manifest"
        return True
    return False


def add_win_rates(rows: list[Row], against: Row) -> None:
    """Each row's win rate against `against` on the same prompts, from the judge's per-prompt scores."""
    if against.reward_scores is None:
        return
    for row in rows:
        if row.reward_scores is None:
            continue
        same = [a == b for a, b in zip(row.response_hashes or [], against.response_hashes or [])]
        row.metrics.update(win_rate(row.reward_scores, against.reward_scores, same or None))
        row.metrics["win_rate_against"] = against.ref


# ------------------------------------------------------------------------------------------ the report


@dataclass
class Report:
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
        if cfg.kind == "reward":
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
                                   judged=judge_source is not None)
    rows = evaluate_rows(recipe, settings, registry, recipe_entries(recipe, registry), judge_source)
    add_win_rates(rows, rows[0])
    folder = Path(out) if out else registry.root / "reports" / recipe.name
    report = Report(recipe=recipe, settings=settings, registry=registry, rows=rows, folder=folder,
                    judge=source_label(judge_source) if judge_source is not None and needs_judge(settings) else None)
    write_report(report)
    return report


def columns(rows: list[Row], checkers: list[str], against: str = "base") -> list[tuple[str, str, object]]:
    """(metric key, header, formatter) for every column some row has a value for."""
    def num(digits):
        return lambda v: f"{v:.{digits}f}"

    def ms(digits):
        return lambda v: f"{v * 1000:.{digits}f}"

    spec = [("perplexity", "perplexity", num(3))]
    spec += [(f"{c}_pass_rate", c, num(3)) for c in checkers]
    spec += [("reward_mean", "reward", num(3)), ("win_rate", f"win rate vs {against}", num(3)),
             ("response_tokens_mean", "tokens", num(1)), ("distinct_1", "distinct-1", num(3)),
             ("distinct_2", "distinct-2", num(3)), ("eos_rate", "EOS rate", num(2)),
             ("time_to_first_token_s", "first token ms", ms(0)), ("time_per_output_token_s", "ms/token", ms(1)),
             ("tokens_per_s", "tokens/s", num(1))]
    return [c for c in spec if any(isinstance(r.metrics.get(c[0]), (int, float)) for r in rows)]


def markdown_table(rows: list[Row], checkers: list[str], against: str = "base") -> str:
    cols = columns(rows, checkers, against)
    lines = ["| entry | ref | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for row in rows:
        cells = []
        for key, _, fmt in cols:
            value = row.metrics.get(key)
            cells.append(fmt(value) if isinstance(value, (int, float)) else "–")
        lines.append(f"| {row.label} | `{row.ref}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
             f"Recipe `{recipe.source}`, registry `{report.registry.root}`, written {_now()}.", "",
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
    data = {"recipe": recipe.name, "source": recipe.source, "created": _now(), "registry": str(report.registry.root),
            "settings": settings.model_dump(), "judge": report.judge, "against": rows[0].ref,
            "rows": [r.as_dict() for r in rows], "plots": [p.name for p in files]}
    write_json_atomic(folder / "report.json", data)
    report.files = [folder / "report.md", folder / "report.json", *files]
    return report.files


def sample_lines(rows: list[Row]) -> list[str]:
    """The `samples` metric as text: each prompt, then every row's response to it ([] when none has any)."""
    samples = [(r.label, r.metrics.get("samples") or []) for r in rows]
    if not any(s for _, s in samples):
        return []
    lines = []
    first = next(s for _, s in samples if s)
    for i, shown in enumerate(first):
        lines += [f"**Prompt:** {_one_line(shown['prompt'])}", ""]
        for label, s in samples:
            if i < len(s):
                lines.append(f"- {label}: {_one_line(s[i]['response'])}")
        lines.append("")
    return lines


def _loss_description(recipe) -> str:
    if recipe.eval.data is not None:
        return f"`{recipe.eval.data.path}`"
    sft = next((n for n, cfg in recipe.stages.items() if cfg.kind == "sft"), None)
    return f"the held-out split of stage {sft}" if sft else "nothing (no eval.data and no SFT stage)"


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------ align eval


def eval_recipe(source, recipe_path: str | None, overrides: list[str], prompts: str | None):
    """Whose eval settings `align eval` uses: `--recipe`, else the recipe recorded in the entry's manifest
    (`recorded_recipe`, from any folder), else defaults over `--prompts`."""
    from align.config.recipe import DataSpec, Defaults, EvalSettings, Recipe, load_recipe

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
    from align.config.recipe import read_recipe_file, validate_recipe

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
    from align.config.recipe import Defaults, EvalSettings, Recipe, apply_overrides

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
        raise AlignError("win rate needs a judge: give --reward-model REF (a reward entry), or set eval.reward_model")
    settings = comparison_settings(recipe.eval, metrics=metrics, limit=limit, generation=generation,
                                   judged=judge_source is not None)
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
    if source.entry is not None and source.entry.kind == "reward":
        raise AlignError(f"{ref} is a reward model, not a policy that answers; score responses with it: "
                         f"align score {ref} --data FILE, or judge with --reward-model {ref}")


def format_eval(rows: list[Row], settings) -> str:
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
    return json.dumps({"settings": settings.model_dump(), "rows": [r.as_dict() for r in rows]}, indent=2,
                      default=str)
