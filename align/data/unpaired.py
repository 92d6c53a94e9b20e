"""Unpaired feedback (KTO's data): a prompt, one completion and whether it is desirable, normalized to chat
messages, with every bad row named and counted.

Accepted row shapes, detected per file from the first row (`format: preference` says pairs):

  unpaired   {"prompt": str | messages, "completion": str | messages, "label": true | false}
             (TRL's unpaired preference format: a completion as text or as an assistant message list)
  pairs      every preference-pair shape the reward and DPO stages read (`align.data.preference`); each pair
             is kept whole here, with its checks, repairs and identical sides dropped and counted, and gives
             a desirable row (chosen) and an undesirable one (rejected) once tokenized
             (`align.data.prepare_unpaired`), so a pair's two rows share its prompt truncation, its row index
             and its side of the held-out split.

A bad unpaired row (a missing field, a label that is not true or false, an empty completion, malformed
messages) is a problem named `file: row N` with a reason to count, dropped or refused per `on_bad_rows`
exactly as bad pairs are (`align.data.prepare.apply_pair_policy` reads both).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from align.data.preference import PairProblem, PreferencePair, RowError, load_pairs, strip_prompt, to_messages
from align.errors import DataError, Problem

FEEDBACK_FORMATS = ("auto", "preference")  # what a KTO stage's `format` may say


@dataclass
class FeedbackRow:
    index: int  # row index in the source file
    prompt: list[dict]
    completion: list[dict]
    desirable: bool


@dataclass
class FeedbackSet:
    """A file's usable rows (unpaired files) or pairs (preference files), and what was wrong with the rest."""

    rows: list[FeedbackRow] = field(default_factory=list)
    pairs: list[PreferencePair] = field(default_factory=list)
    problems: list[PairProblem] = field(default_factory=list)
    identical: list[int] = field(default_factory=list)
    repaired: Counter = field(default_factory=Counter)
    total: int = 0
    format: str = ""  # "unpaired", or the pairs' shape (explicit, implicit, dialogue)

    @property
    def items(self) -> list:
        """The file's source rows that were kept: its pairs or its unpaired rows."""
        return self.pairs or self.rows

    def counts(self) -> tuple[int, int]:
        """(desirable, undesirable) rows: a pair gives one of each."""
        if self.pairs:
            return len(self.pairs), len(self.pairs)
        desirable = sum(1 for r in self.rows if r.desirable)
        return desirable, len(self.rows) - desirable

    def describe(self) -> str:
        desirable, undesirable = self.counts()
        shape = ("unpaired feedback" if self.format == "unpaired" else
                 f"{self.format} preference pairs split into desirable and undesirable rows")
        counts = [f"{len(self.problems)} bad" if self.problems else "",
                  f"{len(self.identical)} identical" if self.identical else "",
                  f"{sum(self.repaired.values())} repaired" if self.repaired else ""]
        extra = f"; {', '.join(c for c in counts if c)}" if any(counts) else ""
        return f"{shape} ({desirable} desirable, {undesirable} undesirable{extra})"


def is_pair_row(row: dict) -> bool:
    return "chosen" in row or "rejected" in row


def load_feedback(rows: list[dict], source: str, fmt: str = "auto") -> FeedbackSet:
    """Normalize every row of one file; bad rows become problems named `source: row N`."""
    if not rows:
        raise DataError(f"{source}: no rows")
    if fmt not in FEEDBACK_FORMATS:
        raise DataError(f"{source}: format {fmt!r} is not one a KTO stage reads ({', '.join(FEEDBACK_FORMATS)}): "
                        "rows of prompt, completion and label, or preference pairs")
    if fmt == "preference" or is_pair_row(rows[0]):
        pairs = load_pairs(rows, source)
        return FeedbackSet(pairs=pairs.pairs, problems=pairs.problems, identical=pairs.identical,
                           repaired=pairs.repaired, total=pairs.total, format=pairs.format)
    if not {"completion", "label"} & set(rows[0]):
        raise DataError(f"{source}: rows have fields {', '.join(sorted(rows[0]))}; a KTO file needs `prompt`, "
                        "`completion` and `label` (true: desirable, false: undesirable), or preference pairs "
                        "(`chosen` and `rejected`)")
    out = FeedbackSet(total=len(rows), format="unpaired")
    for index, row in enumerate(rows):
        try:
            out.rows.append(to_feedback_row(row, index))
        except RowError as err:
            out.problems.append(PairProblem(err.reason, Problem(f"{source}: row {index}", str(err))))
    return out


def to_feedback_row(row: dict, index: int) -> FeedbackRow:
    """One unpaired row as chat messages; `RowError` naming the field otherwise."""
    if not isinstance(row, dict):
        raise RowError("malformed", "a row must be an object with `prompt`, `completion` and `label`")
    for key in ("prompt", "completion", "label"):
        if row.get(key) is None:
            raise RowError("missing field", f"missing field `{key}`")
    label = row["label"]
    if not isinstance(label, bool):
        raise RowError("malformed", f"field `label` must be true (desirable) or false (undesirable), got {label!r}")
    prompt = to_messages(row["prompt"], "prompt", "user")
    completion = strip_prompt(prompt, to_messages(row["completion"], "completion", "assistant"))
    if completion[0]["role"] != "assistant":
        raise RowError("malformed", "`completion` must continue the prompt with an assistant turn")
    if not completion[-1]["content"].strip():
        raise RowError("empty response", "empty completion")
    return FeedbackRow(index=index, prompt=prompt, completion=completion, desirable=label)
