"""Prompt sets for RL and evaluation: rows with a `prompt` (text or chat messages) and the fields checkers read.

A PPO stage generates from these rows and scores what it generates, so a row that cannot be scored is a
data error found before any weights load: a missing prompt, or a missing field a checker needs (an `answer`
for `math_answer`, `tests` for `python_tests`). Such rows are named by file and row, never scored zero
silently. Other fields ride along to the checkers untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from align.data.formats import _as_messages
from align.data.io import fingerprint, read_rows, spec_options
from align.errors import DataError, Problem

PROMPT_FIELDS = ("prompt", "question", "messages", "instruction")
SHOWN = 10


@dataclass
class PromptSet:
    rows: list[dict]  # each: the file's fields plus `messages` (the prompt as chat) and `row` (its index)
    source: str
    fingerprint: str

    def __len__(self) -> int:
        return len(self.rows)


def instruction_input(row: dict) -> str:
    """The input an `instruction` row carries, added after it as the alpaca format does: alpaca's `input`, or
    the first of self-instruct's `instances` (`[{input, output}]`); "" when there is none."""
    extra = row.get("input")
    instances = row.get("instances")
    if extra is None and isinstance(instances, list) and instances and isinstance(instances[0], dict):
        extra = instances[0].get("input")
    return extra if isinstance(extra, str) else ""


def prompt_messages(row: dict) -> list[dict]:
    """The prompt of a row as chat messages; raises ValueError naming the missing or malformed field."""
    for name in PROMPT_FIELDS:
        if row.get(name) is not None:
            messages = _as_messages(row[name], name, "user")
            extra = instruction_input(row) if name == "instruction" and isinstance(row[name], str) else ""
            if extra.strip():
                messages = [{"role": "user", "content": f"{messages[0]['content']}\n\n{extra}"}]
            if messages[-1]["role"] == "assistant":
                raise ValueError(f"`{name}` ends with an assistant turn; a prompt ends with the user's turn")
            return messages
    raise ValueError(f"missing field `prompt` (or one of {', '.join(PROMPT_FIELDS[1:])})")


def prompt_problems(rows: list[dict], source: str, needs: dict[str, tuple[str, ...]]) -> list[Problem]:
    """Every unusable row: no prompt, or a field a checker needs (`needs`: checker name -> fields) missing."""
    problems: list[Problem] = []
    for index, row in enumerate(rows):
        where = f"{source}: row {index}"
        if not isinstance(row, dict):
            problems.append(Problem(where, "expected a JSON object"))
            continue
        try:
            prompt_messages(row)
        except ValueError as err:
            problems.append(Problem(where, str(err)))
        for name, fields in needs.items():
            missing = [f for f in fields if row.get(f) in (None, "", [])]
            if missing:
                problems.append(Problem(where, f"checker {name!r} needs field(s) {', '.join(missing)}"))
    return problems


def load_prompts(recipe, spec, needs: dict[str, tuple[str, ...]] | None = None, limit: int | None = None) -> PromptSet:
    """Read, check and convert a prompt file; raises `DataError` listing the bad rows (file and row)."""
    path = recipe.resolve_path(spec.path) if not spec.path.startswith("hf:") else spec.path
    rows = read_rows(path, **spec_options(spec))
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{spec.path}: no rows")
    problems = prompt_problems(rows, str(spec.path), needs or {})
    if problems:
        shown = [str(p) for p in problems[:SHOWN]]
        more = len(problems) - len(shown)
        raise DataError(f"{spec.path}: {len(problems)} unusable prompt row(s):\n  " + "\n  ".join(shown)
                        + (f"\n  ... and {more} more" if more > 0 else ""))
    out = [{**row, "messages": prompt_messages(row), "row": index} for index, row in enumerate(rows)]
    return PromptSet(rows=out, source=str(spec.path), fingerprint=fingerprint(path, rows))
