"""Pydantic's validation errors in the user's words: a dotted key path, "did you mean", the value given.

Kept apart from loading so the wording of messages can change without touching how recipes are read.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, get_args

from pydantic import BaseModel

from align.config.recipe import Recipe, stage_config_types
from align.config.schema import CrossFieldProblems
from align.errors import Problem


def format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def clean_loc(loc: tuple) -> tuple:
    """Drop the tags pydantic adds to a path: the stage kind (`stages.sft.sft.lr` -> `stages.sft.lr`) and
    union members (`...targets.list[str]`)."""
    loc = tuple(loc)
    if len(loc) > 2 and loc[0] == "stages" and loc[2] in stage_config_types():
        loc = loc[:2] + loc[3:]
    return tuple(p for p in loc if not (isinstance(p, str) and re.match(r"^(function-|literal\[|list\[|str$|int$)", p)))


def _fields_at(loc: tuple, raw: dict) -> list[str]:
    """The keys allowed at `loc` (for 'did you mean'), walking the schema along the path."""
    model: Any = Recipe
    for i, part in enumerate(loc):
        if isinstance(part, int):
            continue
        if model is Recipe and part == "stages" and i + 1 < len(loc):
            body = (raw.get("stages") or {}).get(loc[i + 1], {})
            kind = body.get("kind", loc[i + 1]) if isinstance(body, dict) else None
            model = stage_config_types().get(kind)
            if model is None:
                return []
            loc = loc[: i + 2]
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = model.model_fields.get(part)
        if field is None:
            continue
        model = model_in(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [f.alias or n for n, f in model.model_fields.items() if n not in ("source", "workdir")]
    return []


def model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


_EXPECTED = {
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


def problems_from_pydantic(error: dict, raw: dict) -> list[Problem]:
    """The problems of one pydantic error (its path already cleaned by `_placed`): one per conflict of a
    block's `CrossFieldProblems`, else one."""
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, CrossFieldProblems):
        where = format_loc(tuple(error["loc"]))
        return [Problem(where, m[:1].lower() + m[1:]) for m in cause.messages]
    return [_problem_from_pydantic(error, raw)]


def _problem_from_pydantic(error: dict, raw: dict) -> Problem:
    loc = tuple(error["loc"])
    where = format_loc(loc)
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1], raw)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else (f" (allowed: {', '.join(allowed)})" if allowed else "")
        return Problem(where, f"unknown key{hint}")
    if kind == "missing":
        return Problem(where, "required key is missing")
    if kind == "literal_error":
        return Problem(where, f"expected one of {error['ctx']['expected']}, got {_show(value)}")
    if kind in _EXPECTED:
        return Problem(where, f"{_EXPECTED[kind]}, got {_show(value)}")
    if kind == "string_pattern_mismatch":
        return Problem(where, f"{_show(value)} must be lowercase letters, digits, '.', '_' or '-'")
    message = error["msg"]
    message = re.sub(r"^(Value error|Assertion failed), ", "", message)
    message = message[0].lower() + message[1:] if message else message
    if value is not None and kind not in {"value_error", "assertion_error"} and not isinstance(value, dict):
        message += f", got {_show(value)}"
    return Problem(where, message)
