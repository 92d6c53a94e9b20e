"""Entries evaluated the same way, so their numbers compare: one set of settings, prompts, held-out
examples and judge for all, and a result reused only when its fingerprint (settings, data, judge)
matches: the manifest's own hook metrics where no per-prompt data is needed, else an earlier evaluation
kept in the manifest under `evaluations` (numbers, per-prompt scores and response hashes; no weights are
loaded then). Win rate is computed from the per-prompt scores (ties count half, identical responses
tie). Shared by the cross-stage report (`align.pipeline.report`) and `align eval` (`align.pipeline.eval_entry`).
"""

from __future__ import annotations

import datetime as _dt
import gc
import logging
from dataclasses import dataclass, field

from align.errors import AlignError
from align.eval.hook import eval_fingerprint, load_eval_prompts, run_metrics
from align.eval.judges import load_judge, needs_judge, resolve_eval_ref, source_label
from align.eval.metrics import response_hash, win_rate
from align.registry.fingerprint import hash_json
from align.registry.store import Registry
from align.stages import stage_class

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
                        generation: dict | None = None, judged: bool = True, judge_given: bool = False):
    """The eval settings for a comparison: the recipe's, with its metrics plus reward, win rate, length,
    repetition and speed (reward and win rate only with a judge) unless `metrics` names them, and with the
    `generation` overrides (command-line flags) applied. `judge_given`: a reward entry named on the command
    line judges instead of the recipe's `eval.judge`."""
    from align.config.recipe import EvalSettings
    from align.eval.metrics import METRICS
    from align.models.generation import settings_with
    from align.rewards.plugins import is_plugin_spec

    if metrics:
        unknown = [m for m in metrics if m not in METRICS and not is_plugin_spec(m)]  # user code: checked on use
        if unknown:
            raise AlignError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
        if not judged and any(m in JUDGED for m in metrics):
            raise AlignError("metrics reward and win_rate need a judge: give --reward-model REF (a reward entry)")
        chosen = list(metrics)
    else:
        chosen = list(dict.fromkeys([*settings.metrics, *EXTRA_METRICS]))
        if not judged:
            chosen = [m for m in chosen if m not in JUDGED]
    update = {"metrics": chosen, **({"judge": None} if judge_given else {})}
    if limit is not None:
        update["limit"] = limit
    if generation:
        update["generation"] = settings_with(settings.generation, generation).model_dump()
    return EvalSettings.model_validate({**settings.model_dump(), **update})


def default_judge(recipe, registry: Registry, explicit: str | None = None):
    """The model that judges: `explicit` (a reward entry), else `eval.reward_model`, else the causal LM of
    `eval.judge`, else the recipe's latest reward stage entry; None when there is none."""
    if explicit:
        source = resolve_eval_ref(recipe, explicit, registry)
        if source is None:
            raise AlignError(f"{explicit}: stage of {recipe.name} with no registry entry yet")
        return source
    if recipe.eval.reward_model:
        return resolve_eval_ref(recipe, recipe.eval.reward_model, registry)
    if recipe.eval.judge is not None:
        return resolve_eval_ref(recipe, recipe.eval.judge.judge, registry)
    for name in reversed(list(recipe.stages)):
        if stage_class(recipe.stages[name].kind).entry_kind == "reward":
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
    for cfg in recipe.stages.values():  # the first stage with held-out demonstrations (SFT)
        heldout = stage_class(cfg.kind).heldout_demonstrations(recipe, cfg, tokenizer)
        if heldout is not None:
            break
    else:
        return [], None
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
        judge = load_judge(judge_source, registry, settings.batch_size, settings.judge) if judged else None
        # User checkers and metrics are found as the stages find them (`Recipe.resolve_path`).
        metrics, ctx = run_metrics(model, tokenizer, settings, prompt_rows, loss_data, judge,
                                   resolve_path=recipe.resolve_path)
        metrics["eval_fingerprint"] = row.fingerprint
        row.metrics = metrics
        if judged:
            row.reward_scores = list(ctx.reward_scores)
            row.response_hashes = [response_hash(g) for g in ctx.generations]
        del model, ctx
        gc.collect()
        if save and source.entry is not None:
            record = {"created": now_utc(), "metrics": metrics, "reward_scores": row.reward_scores,
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


def now_utc() -> str:
    """This moment in UTC, to the second: when an evaluation or a report was made."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
