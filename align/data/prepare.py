"""From a recipe's data spec to checked, split, tokenized examples, with a report of what was dropped.

Shared by `align plan` (which stops before tokenizing) and the stages. Dropping is never silent: every
dropped row is counted by reason in the report that goes to the log and the manifest, and a run stops
when more than `max_dropped_share` of the rows were dropped.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from align.data.formats import Conversations, load_conversations
from align.data.io import fingerprint, read_rows, spec_options
from align.data.preference import PairSet, load_pairs
from align.data.tokenize import Encoded, EncodedPair, encode_conversation, encode_pair
from align.errors import DataError, Problem

log = logging.getLogger(__name__)
SHOWN_PROBLEMS = 10


@dataclass
class DataReport:
    source: str
    fingerprint: str
    rows: int
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    repaired: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        out = {"source": self.source, "fingerprint": self.fingerprint, "rows": self.rows, "kept": self.kept,
               "dropped": dict(self.dropped), "dropped_examples": self.examples[:SHOWN_PROBLEMS]}
        if self.repaired:
            out["repaired"] = dict(self.repaired)
        if self.truncated:
            out["truncated"] = dict(self.truncated)
        return out


def load_demonstrations(recipe, spec) -> tuple[Conversations, DataReport]:
    path = recipe.resolve_path(spec.path) if not spec.path.startswith("hf:") else spec.path
    rows = read_rows(path, **spec_options(spec))
    if not rows:
        raise DataError(f"{spec.path}: no rows")
    conversations = load_conversations(rows, spec.format, str(spec.path))
    report = DataReport(source=str(spec.path), fingerprint=fingerprint(path, rows), rows=len(rows))
    return conversations, report


def apply_row_policy(conversations: Conversations, report: DataReport, policy: str) -> None:
    """`error`: refuse the file listing bad rows; `drop`: count and keep going."""
    if not conversations.problems:
        return
    if policy == "error":
        shown = conversations.problems[:SHOWN_PROBLEMS]
        more = len(conversations.problems) - len(shown)
        lines = [str(p) for p in shown] + ([f"... and {more} more"] if more > 0 else [])
        raise DataError(f"{report.source}: {len(conversations.problems)} bad row(s) "
                        "(set on_bad_rows: drop to skip them):\n  " + "\n  ".join(lines))
    for problem in conversations.problems:
        report.dropped[_reason(problem.message)] += 1
        report.examples.append(str(problem))


def _reason(message: str) -> str:
    if message.startswith("missing field"):
        return "missing field"
    if "empty" in message:
        return "empty response"
    return "malformed"


def heldout_split(count: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/held-out index split (seeded shuffle); at least one row each when share > 0."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_eval = 0 if share <= 0 else max(1, min(count - 1, round(count * share)))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def tokenize_all(tokenizer, conversations: list[list[dict]], max_length: int, assistant_only: bool,
                 report: DataReport, where: str, rows: list[int] | None = None) -> list[Encoded]:
    """Tokenize each conversation; one with no trainable token left within `max_length` is dropped and named
    by its row in the file (`rows`: each conversation's file row, as `Conversations.kept_index` holds it;
    default its position), not by its place after the held-out split."""
    out = []
    for index, messages in enumerate(conversations):
        encoded = encode_conversation(tokenizer, messages, max_length, assistant_only)
        if encoded.trainable == 0:
            row = rows[index] if rows is not None else index
            report.dropped["no trainable tokens after truncation"] += 1
            report.examples.append(f"{where}: row {row}: no trainable tokens within max_length {max_length}")
            continue
        out.append(encoded)
    return out


def dropped_share_problem(report: DataReport, limit: float) -> str | None:
    """Why `report` dropped more than `max_dropped_share` of its rows, or None. `align plan` asks it about the
    rows it sees dropped, the stages about every row they dropped: a plan that is OK does not fail on it later."""
    dropped = sum(report.dropped.values())
    if report.rows and dropped / report.rows > limit:
        reasons = ", ".join(f"{n} {why}" for why, n in report.dropped.items())
        return (f"{report.source}: dropped {dropped} of {report.rows} rows ({reasons}), more than the allowed "
                f"share {limit:.0%} (max_dropped_share)")
    return None


def check_dropped_share(report: DataReport, limit: float) -> None:
    """Stop a stage that dropped too many rows (`dropped_share_problem`); else log what it dropped."""
    why = dropped_share_problem(report, limit)
    if why:
        raise DataError(why)
    dropped = sum(report.dropped.values())
    if dropped:
        log.warning("%s: dropped %d of %d rows: %s", report.source, dropped, report.rows, dict(report.dropped))


def problems_for_plan(conversations: Conversations, policy: str, where: str) -> list[Problem]:
    """Row problems as plan problems (only when the policy refuses bad rows)."""
    if policy != "error" or not conversations.problems:
        return []
    shown = conversations.problems[:SHOWN_PROBLEMS]
    out = [Problem(f"{where}: {p.where}", p.message) for p in shown]
    if len(conversations.problems) > len(shown):
        out.append(Problem(where, f"... and {len(conversations.problems) - len(shown)} more bad rows"))
    return out


# ------------------------------------------------------------------------------------------ preference pairs


def load_preference_rows(recipe, spec, margin_field: str | None) -> tuple[PairSet, DataReport]:
    path = recipe.resolve_path(spec.path) if not spec.path.startswith("hf:") else spec.path
    rows = read_rows(path, **spec_options(spec))
    if not rows:
        raise DataError(f"{spec.path}: no rows")
    pairs = load_pairs(rows, str(spec.path), margin_field)
    report = DataReport(source=str(spec.path), fingerprint=fingerprint(path, rows), rows=len(rows))
    return pairs, report


def apply_pair_policy(pairs: PairSet, report: DataReport, policy: str) -> None:
    """Bad rows: refused (`error`) or counted and dropped; identical sides are always dropped and counted."""
    if pairs.problems and policy == "error":
        shown = [str(p.problem) for p in pairs.problems[:SHOWN_PROBLEMS]]
        more = len(pairs.problems) - len(shown)
        raise DataError(f"{report.source}: {len(pairs.problems)} bad row(s) (set on_bad_rows: drop to skip them):"
                        "\n  " + "\n  ".join(shown + ([f"... and {more} more"] if more > 0 else [])))
    for item in pairs.problems:
        report.dropped[item.reason] += 1
        report.examples.append(str(item.problem))
    for index in pairs.identical:
        report.dropped["identical chosen and rejected"] += 1
        report.examples.append(f"{report.source}: row {index}: identical chosen and rejected")
    report.repaired.update(pairs.repaired)


def encode_pairs(tokenizer, pairs, cfg, report: DataReport) -> list[EncodedPair]:
    """Tokenize pairs per the stage's length settings; refused pairs are counted, truncations too."""
    out = []
    for pair in pairs:
        encoded = encode_pair(tokenizer, pair.prompt, pair.chosen, pair.rejected, cfg.max_length,
                              cfg.max_prompt_length, cfg.truncation)
        if isinstance(encoded, str):
            report.dropped[encoded] += 1
            report.examples.append(f"{report.source}: row {pair.index}: {encoded} ({cfg.max_length} tokens)")
            continue
        encoded.index, encoded.margin = pair.index, pair.margin
        if encoded.truncated:
            report.truncated[encoded.truncated] += 1
        out.append(encoded)
    return out


def prepare_pairs(recipe, cfg, tokenizer) -> tuple[list[EncodedPair], list[EncodedPair], DataReport]:
    """Train and held-out pairs for a reward or DPO stage, checked, split and tokenized, with the report.

    The held-out split is taken by row before tokenization and is seeded, so it is the same pairs on
    every run and a resumed run evaluates on exactly what the first one held out."""
    pairs, report = load_preference_rows(recipe, cfg.data, cfg.margin_field)
    apply_pair_policy(pairs, report, cfg.on_bad_rows)
    rows = pairs.pairs
    eval_report = None
    if cfg.eval_data is not None:
        eval_pairs, eval_report = load_preference_rows(recipe, cfg.eval_data, cfg.margin_field)
        apply_pair_policy(eval_pairs, eval_report, cfg.on_bad_rows)
        train_rows, eval_rows = rows, eval_pairs.pairs
    else:
        train_idx, eval_idx = heldout_split(len(rows), cfg.eval_split, cfg.seed)
        train_rows, eval_rows = [rows[i] for i in train_idx], [rows[i] for i in eval_idx]
    train = encode_pairs(tokenizer, train_rows, cfg, report)
    heldout = encode_pairs(tokenizer, eval_rows, cfg, eval_report or report)
    report.kept = len(train) + (0 if eval_report else len(heldout))
    check_dropped_share(report, cfg.max_dropped_share)
    if eval_report is not None:
        eval_report.kept = len(heldout)
        check_dropped_share(eval_report, cfg.max_dropped_share)
    if not train:
        raise DataError(f"{cfg.data.path}: no training pairs left after checks")
    log_report(report)
    return train, heldout, report


def log_report(report: DataReport) -> None:
    """One log line: rows kept of the file's, and what was repaired or truncated."""
    parts = [f"{report.kept} of {report.rows} rows kept"]
    if report.repaired:
        parts.append("repaired: " + ", ".join(f"{n} {why}" for why, n in report.repaired.items()))
    if report.truncated:
        parts.append("truncated: " + ", ".join(f"{n} {why}" for why, n in report.truncated.items()))
    log.info("%s: %s", report.source, "; ".join(parts))


def pair_problems_for_plan(pairs: PairSet, policy: str, where: str) -> list[Problem]:
    if policy != "error" or not pairs.problems:
        return []
    shown = pairs.problems[:SHOWN_PROBLEMS]
    out = [Problem(f"{where}: {p.problem.where}", p.problem.message) for p in shown]
    if len(pairs.problems) > len(shown):
        out.append(Problem(where, f"... and {len(pairs.problems) - len(shown)} more bad rows"))
    return out
