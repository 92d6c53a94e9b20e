"""The plan's data checks: each data file read, its rows checked under the stage's row policy and counted,
before any weights load."""

from __future__ import annotations

from align.data.formats import load_conversations
from align.data.io import check_source, is_hub_dataset, read_rows, spec_options
from align.data.preference import load_pairs
from align.data.prepare import (
    DataReport,
    apply_pair_policy,
    apply_row_policy,
    dropped_share_problem,
    pair_problems_for_plan,
    problems_for_plan,
)
from align.data.prompts import prompt_problems
from align.data.unpaired import load_feedback
from align.errors import AlignError, Problem
from align.rewards.checkers import fields_needed
from align.stages import stage_class


def longest_demonstration(recipe, cfg, tokenizer, limit: int = 5000) -> int | None:
    """Tokens in the longest of the first `limit` training conversations (capped at max_length)."""
    from align.data.tokenize import encode_conversation

    if tokenizer is None or is_hub_dataset(cfg.data.path):
        return None
    try:
        rows = read_rows(recipe.resolve_path(cfg.data.path), **{**spec_options(cfg.data), "limit": cfg.data.limit or limit})
        conversations = load_conversations(rows[:limit], cfg.data.format, str(cfg.data.path))
        if cfg.chat_template is not None:
            from align.stages.building import read_chat_template

            tokenizer.chat_template = read_chat_template(cfg.chat_template, recipe)
        return max(len(encode_conversation(tokenizer, c, cfg.max_length).input_ids) for c in conversations.rows)
    except (AlignError, OSError, ValueError, KeyError, TypeError):  # bad data is named by the data checks;
        return None  # the estimate then takes max_length


def check_data(recipe, spec, where: str, cfg, problems: list[Problem], bad: set[str] = frozenset()) -> list[str]:
    """File readable, rows in a known format; returns notes for the printed plan. `bad`: the stage's keys that
    failed validation; the row policies that read them (`on_bad_rows`, `max_dropped_share`, `margin_field`,
    the checkers' fields) are left out, the file and format checks still run."""
    policy_ok = not bad & {"on_bad_rows", "max_dropped_share"}
    if is_hub_dataset(spec.path):
        pinned = "".join(f", {key} {getattr(spec, key)}" for key in ("config", "revision") if getattr(spec, key))
        return [f"{where.split('.')[-1]}: hub dataset {spec.path[3:]} (split {spec.split}{pinned}; checked when loaded)"]
    path = recipe.resolve_path(spec.path)
    why = check_source(path)
    if why:
        problems.append(Problem(where, f"{spec.path}: {why}"))
        return []
    try:
        rows = read_rows(path, **spec_options(spec))
    except AlignError as err:
        problems.append(Problem(where, str(err)))
        return []
    if not rows:
        problems.append(Problem(where, f"{spec.path}: no rows"))
        return []
    note = f"{where.split('.')[-1]}: {spec.path} ({len(rows)} rows)"
    if data_kind(cfg) == "conversations" and where.endswith(("data", "eval_data")):
        try:
            conversations = load_conversations(rows, spec.format, str(spec.path))
        except AlignError as err:
            problems.append(Problem(where, str(err)))
            return []
        if "on_bad_rows" not in bad:
            problems += problems_for_plan(conversations, cfg.on_bad_rows, where)
        note += f", format {conversations.format}"
        if conversations.problems and cfg.on_bad_rows == "drop" and policy_ok:
            note += f", {len(conversations.problems)} bad rows to drop"
            _check_dropped_share(spec, len(rows), lambda report: apply_row_policy(conversations, report, "drop"),
                                 cfg, where, problems)
    if data_kind(cfg) == "prompts":
        needs = {} if "rewards" in bad else fields_needed(s.checker for s in cfg.rewards if s.checker is not None)
        check_prompt_rows(rows, str(spec.path), needs, where, problems)
        note += ", prompts" + (f" checked for {', '.join(sorted(needs))}" if needs else "")
    if data_kind(cfg) == "feedback":
        return check_feedback_rows(rows, spec, where, cfg, problems, bad, note)
    if data_kind(cfg) == "pairs":
        try:
            pairs = load_pairs(rows, str(spec.path), None if "margin_field" in bad else cfg.margin_field)
        except AlignError as err:
            problems.append(Problem(where, str(err)))
            return []
        if "on_bad_rows" not in bad:
            problems += pair_problems_for_plan(pairs, cfg.on_bad_rows, where)
        if policy_ok and not (pairs.problems and cfg.on_bad_rows == "error"):  # else refused above, row by row
            _check_dropped_share(spec, len(rows), lambda report: apply_pair_policy(pairs, report, cfg.on_bad_rows),
                                 cfg, where, problems)
        note += f", {pairs.format} preference pairs"
        counts = [f"{len(pairs.problems)} bad" if pairs.problems else "",
                  f"{len(pairs.identical)} identical" if pairs.identical else "",
                  f"{sum(pairs.repaired.values())} repaired" if pairs.repaired else ""]
        if any(counts):
            note += " (" + ", ".join(c for c in counts if c) + ")"
    return [note]


def check_feedback_rows(rows: list[dict], spec, where: str, cfg, problems: list[Problem], bad: set[str],
                        note: str) -> list[str]:
    """A KTO stage's rows (`align.data.unpaired`: unpaired rows or pairs) under its row policy, and a warning
    when the training rows' desirable and undesirable counts are weighted outside the paper's advice."""
    from align.objectives.unpaired import weight_advice  # its module imports torch; the plan need not

    try:
        feedback = load_feedback(rows, str(spec.path), spec.format)
    except AlignError as err:
        problems.append(Problem(where, str(err)))
        return []
    if "on_bad_rows" not in bad:
        problems += pair_problems_for_plan(feedback, cfg.on_bad_rows, where)
    if not bad & {"on_bad_rows", "max_dropped_share"} and not (feedback.problems and cfg.on_bad_rows == "error"):
        _check_dropped_share(spec, len(rows), lambda report: apply_pair_policy(feedback, report, cfg.on_bad_rows),
                             cfg, where, problems)
    notes = [f"{note}, {feedback.describe()}"]
    advice = None if not where.endswith(".data") or bad & {"desirable_weight", "undesirable_weight"} else \
        weight_advice(*feedback.counts(), cfg.desirable_weight, cfg.undesirable_weight)
    return notes + ([f"warning: {advice}"] if advice else [])


def _check_dropped_share(spec, rows: int, drop, cfg, where: str, problems: list[Problem]) -> None:
    """The stage's `max_dropped_share` on the rows the plan already sees dropped (`drop(report)` counts them as
    the stage does), with the stage's own message, so the plan refuses what the run would refuse. Rows dropped
    only once tokenized (too long for `max_length`) are not seen here and can still add to them."""
    report = DataReport(source=str(spec.path), fingerprint="", rows=rows)
    drop(report)
    why = dropped_share_problem(report, cfg.max_dropped_share)
    if why:
        problems.append(Problem(where, why))


def check_prompt_rows(rows: list[dict], source: str, needs: dict, where: str, problems: list[Problem]) -> None:
    """Prompt rows without a prompt or without a field a checker reads, the first ten named by file and row."""
    found = prompt_problems(rows, source, needs)
    problems += [Problem(where, str(p)) for p in found[:10]]
    if len(found) > 10:
        problems.append(Problem(where, f"... and {len(found) - 10} more unusable prompt rows"))


def data_kind(cfg) -> str:
    """What the stage's data files hold (`Stage.data_kind`): conversations, pairs, feedback (KTO) or prompts."""
    return stage_class(cfg.kind).data_kind
