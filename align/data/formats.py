"""Demonstration formats, normalized to chat messages so the model's own chat template applies.

Accepted row shapes (detected from the first row's keys unless the recipe names a format):
  messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  prompt_completion  {"prompt": str | messages, "completion": str | messages}   (also question/answer)
  alpaca             {"instruction": str, "input": str (optional), "output": str}

Every row is checked; a bad row becomes a `Problem` that names the file and row index, so the caller
can drop it (counted) or refuse the file, per the recipe's `on_bad_rows` policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from align.errors import DataError, Problem

ROLES = {"system", "user", "assistant", "tool"}
SFT_FORMATS = ("messages", "prompt_completion", "alpaca")


@dataclass
class Conversations:
    """Normalized rows plus what was dropped and why."""

    rows: list[list[dict]]
    kept_index: list[int]
    problems: list[Problem] = field(default_factory=list)
    total: int = 0
    format: str = ""

    @property
    def dropped(self) -> int:
        return self.total - len(self.rows)


def detect_format(row: dict) -> str | None:
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys or {"question", "answer"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return None


def to_conversation(row: dict, fmt: str) -> list[dict]:
    """One row as chat messages; raises ValueError with a reason that names the field."""
    if fmt == "messages":
        return _check_messages(row.get("messages"), "messages")
    if fmt == "prompt_completion":
        prompt_key, completion_key = ("prompt", "completion") if "prompt" in row or "completion" in row \
            else ("question", "answer")
        prompt = _as_messages(row.get(prompt_key), prompt_key, "user")
        completion = _as_messages(row.get(completion_key), completion_key, "assistant")
        return _check_messages(prompt + completion, completion_key)
    if fmt == "alpaca":
        instruction = _text(row.get("instruction"), "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("field `input` must be a string")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _check_messages([{"role": "user", "content": user},
                                {"role": "assistant", "content": _text(row.get("output"), "output")}], "output")
    raise ValueError(f"unknown format {fmt!r}")


def load_conversations(rows: list[dict], fmt: str, source: str) -> Conversations:
    """Normalize all rows; rows that fail become problems named `source: row N`."""
    if fmt == "auto":
        fmt = detect_format(rows[0]) if rows else None
        if fmt is None:
            keys = ", ".join(sorted(rows[0])) if rows else "no rows"
            raise DataError(f"{source}: cannot tell the data format from the fields ({keys}); expected "
                            "`messages`, `prompt`+`completion`, or `instruction`+`output`")
    if fmt not in SFT_FORMATS:
        raise DataError(f"{source}: format {fmt!r} is not a demonstration format ({', '.join(SFT_FORMATS)})")
    result = Conversations(rows=[], kept_index=[], total=len(rows), format=fmt)
    for index, row in enumerate(rows):
        try:
            result.rows.append(to_conversation(row, fmt))
            result.kept_index.append(index)
        except ValueError as err:
            result.problems.append(Problem(f"{source}: row {index}", str(err)))
    return result


def _text(value, name: str) -> str:
    if value is None:
        raise ValueError(f"missing field `{name}`")
    if not isinstance(value, str):
        raise ValueError(f"field `{name}` must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field `{name}` is empty")
    return value


def _as_messages(value, name: str, role: str) -> list[dict]:
    if isinstance(value, list):
        return _check_messages(value, name, need_assistant=False)
    return [{"role": role, "content": _text(value, name)}]


def _check_messages(messages, name: str, need_assistant: bool = True) -> list[dict]:
    if messages is None:
        raise ValueError(f"missing field `{name}`")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field `{name}` must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"`{name}[{i}]` must have `role` and `content`")
        if message["role"] not in ROLES:
            raise ValueError(f"`{name}[{i}].role` is {message['role']!r}; expected one of {', '.join(sorted(ROLES))}")
        if not isinstance(message["content"], str):
            raise ValueError(f"`{name}[{i}].content` must be a string")
        if message["role"] == "assistant" and not message["content"].strip():
            raise ValueError(f"`{name}[{i}]` is an empty assistant response")
        out.append({"role": message["role"], "content": message["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"`{name}` has no assistant message to learn from")
    return out
