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
from align.data.io import fingerprint, read_rows
from align.data.tokenize import Encoded, encode_conversation
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

    def as_dict(self) -> dict:
        return {"source": self.source, "fingerprint": self.fingerprint, "rows": self.rows, "kept": self.kept,
                "dropped": dict(self.dropped), "dropped_examples": self.examples[:SHOWN_PROBLEMS]}


def load_demonstrations(recipe, spec) -> tuple[Conversations, DataReport]:
    path = recipe.resolve_path(spec.path) if not spec.path.startswith("hf:") else spec.path
    rows = read_rows(path, split=spec.split, limit=spec.limit)
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
                 report: DataReport, where: str) -> list[Encoded]:
    out = []
    for index, messages in enumerate(conversations):
        encoded = encode_conversation(tokenizer, messages, max_length, assistant_only)
        if encoded.trainable == 0:
            report.dropped["no trainable tokens after truncation"] += 1
            report.examples.append(f"{where}: example {index}: no trainable tokens within max_length {max_length}")
            continue
        out.append(encoded)
    return out


def check_dropped_share(report: DataReport, limit: float) -> None:
    dropped = sum(report.dropped.values())
    if report.rows and dropped / report.rows > limit:
        reasons = ", ".join(f"{n} {why}" for why, n in report.dropped.items())
        raise DataError(f"{report.source}: dropped {dropped} of {report.rows} rows ({reasons}), more than the "
                        f"allowed share {limit:.0%} (max_dropped_share)")
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
