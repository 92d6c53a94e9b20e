"""Preference pairs, normalized to chat messages, with every bad row named and counted.

Shared by the reward and DPO stages (and `align score`). Accepted row shapes, detected per file from
the first row unless the recipe says `format: preference`:

  explicit   {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
  implicit   {"chosen": messages, "rejected": messages}: whole dialogues sharing a prefix
  dialogue   {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": "..."}: Anthropic HH strings,
             parsed into chat messages so the policy's own chat template applies

In the implicit and dialogue shapes the prompt is the longest common run of messages; the responses are
what follows. Real data is untidy: when the two dialogues diverge before their final assistant turn (a
"Human:" turn run into an assistant turn) the pair is kept with multi-turn responses and counted as
repaired; an empty side, a missing field or a malformed row is a problem named by row index (dropped or
refused per `on_bad_rows`); identical sides teach nothing and are always dropped and counted.
An optional per-pair margin is read from a named field.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from align.data.formats import ROLES
from align.errors import DataError, Problem

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_ROLE = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferencePair:
    index: int  # row index in the source file
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    margin: float | None = None


@dataclass
class PairProblem:
    """A row that cannot be used: `reason` is the short count key, `problem` names file and row."""

    reason: str
    problem: Problem


@dataclass
class PairSet:
    pairs: list[PreferencePair]
    problems: list[PairProblem] = field(default_factory=list)
    identical: list[int] = field(default_factory=list)
    repaired: Counter = field(default_factory=Counter)
    total: int = 0
    format: str = ""


def detect_preference_shape(row: dict) -> str | None:
    if "chosen" not in row and "rejected" not in row:
        return None
    if "prompt" in row:
        return "explicit"
    sample = row.get("chosen", row.get("rejected"))
    if isinstance(sample, list):
        return "implicit"
    if isinstance(sample, str) and _TURN.search(sample):
        return "dialogue"
    return "explicit"  # a plain-text chosen without a prompt: reported per row as a missing prompt


def load_pairs(rows: list[dict], source: str, margin_field: str | None = None) -> PairSet:
    """Normalize every row; bad rows become problems named `source: row N` with a reason to count."""
    if not rows:
        raise DataError(f"{source}: no rows")
    shape = detect_preference_shape(rows[0])
    if shape is None:
        raise DataError(f"{source}: rows have fields {', '.join(sorted(rows[0]))}; a preference file needs "
                        "`chosen` and `rejected` (and `prompt`, unless they are whole dialogues)")
    out = PairSet(pairs=[], total=len(rows), format=shape)
    for index, row in enumerate(rows):
        where = f"{source}: row {index}"
        try:
            pair, repaired = _to_pair(row, index, margin_field)
        except RowError as err:
            out.problems.append(PairProblem(err.reason, Problem(where, str(err))))
            continue
        if pair.chosen == pair.rejected:
            out.identical.append(index)
            continue
        if repaired:
            out.repaired[repaired] += 1
        out.pairs.append(pair)
    return out


class RowError(ValueError):
    """A row that cannot be used: `reason` is the short count key, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _to_pair(row: dict, index: int, margin_field: str | None) -> tuple[PreferencePair, str | None]:
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise RowError("missing field", f"missing field `{key}`")
    margin = None
    if margin_field:
        value = row.get(margin_field)
        if value is None:
            raise RowError("missing field", f"missing field `{margin_field}` (the recipe's margin_field)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RowError("malformed", f"field `{margin_field}` must be a number, got {value!r}")
        margin = float(value)
    repaired = None
    if "prompt" in row:
        if row["prompt"] is None:
            raise RowError("missing field", "missing field `prompt`")
        prompt = to_messages(row["prompt"], "prompt", "user")
        chosen = to_messages(row["chosen"], "chosen", "assistant")
        rejected = to_messages(row["rejected"], "rejected", "assistant")
        chosen, rejected = strip_prompt(prompt, chosen), strip_prompt(prompt, rejected)
    else:
        if isinstance(row["chosen"], str) and not _TURN.search(row["chosen"]):
            raise RowError("missing field", "missing field `prompt` (chosen is plain text, not a dialogue)")
        whole_chosen = to_messages(row["chosen"], "chosen", "assistant", dialogue=True)
        whole_rejected = to_messages(row["rejected"], "rejected", "assistant", dialogue=True)
        prompt, chosen, rejected = _split_common_prefix(whole_chosen, whole_rejected)
        if len(chosen) > 1 or len(rejected) > 1:
            repaired = "dialogues diverge before the final assistant turn (kept with multi-turn responses)"
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side:
            raise RowError("malformed", f"`{name}` adds nothing after the prompt")
        if side[0]["role"] != "assistant" and not repaired:
            raise RowError("malformed", f"`{name}` must continue the prompt with an assistant turn")
        if not side[-1]["content"].strip():
            raise RowError("empty response", f"empty {name} response")
    if not prompt:
        raise RowError("malformed", "no prompt: the two sides share no opening turn")
    return PreferencePair(index=index, prompt=prompt, chosen=chosen, rejected=rejected, margin=margin), repaired


def to_messages(value, name: str, role: str, dialogue: bool = False) -> list[dict]:
    if isinstance(value, str):
        if dialogue:
            return parse_dialogue(value, name)
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError("malformed", f"field `{name}` must be text or a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError("malformed", f"`{name}[{i}]` must have `role` and `content`")
        if message["role"] not in ROLES or not isinstance(message["content"], str):
            raise RowError("malformed", f"`{name}[{i}]` has role {message['role']!r} or non-text content")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def parse_dialogue(text: str, name: str = "dialogue") -> list[dict]:
    """`\\n\\nHuman: hi\\n\\nAssistant: hello` -> chat messages (text before the first turn is refused)."""
    marks = list(_TURN.finditer(text))
    if not marks or text[: marks[0].start()].strip():
        raise RowError("malformed", f"`{name}` is not a `Human:`/`Assistant:` dialogue")
    out = []
    for mark, nxt in zip(marks, marks[1:] + [None]):
        content = text[mark.end(): nxt.start() if nxt else len(text)].strip()
        out.append({"role": _ROLE[mark.group(1)], "content": content})
    return out


def strip_prompt(prompt: list[dict], side: list[dict]) -> list[dict]:
    """Some files repeat the prompt inside `chosen`/`rejected`; keep only the continuation."""
    return side[len(prompt):] if len(side) > len(prompt) and side[: len(prompt)] == prompt else side


def _split_common_prefix(a: list[dict], b: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Prompt = the longest common run of messages ending before an assistant turn on both sides."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    # The responses must start at an assistant turn; back up to the last turn that precedes one.
    while n > 0 and not (n < len(a) and a[n]["role"] == "assistant" and n < len(b) and b[n]["role"] == "assistant"):
        n -= 1
    return a[:n], a[n:], b[n:]
