"""Plan-time checks of checker argument values (`Checker.args_problem` checks their names).

A checker never raises: a value it cannot use (`tolerance: "x"`, `timeout: -1`) makes every completion
score 0.0 at run time, which looks like a policy that learned nothing. The value's type comes from the
checker function's annotation (float, int, bool and str parameters; others are left to the checker), its
range from `BOUNDS`, so a new checker gets the type check without registering anything.
"""

from __future__ import annotations

import math
import typing

from pydantic import TypeAdapter, ValidationError

# Parameter name -> (lower bound, whether the bound itself is allowed), for every checker that takes it.
BOUNDS: dict[str, tuple[float, bool]] = {
    "timeout": (0.0, False),     # seconds a test block may run
    "memory_mb": (0.0, False),   # address-space limit of the test process
    "tolerance": (0.0, True),    # relative tolerance of math_answer
}
CHECKED_TYPES = (float, int, bool, str)


def argument_value_problems(checker, args: dict) -> list[str]:
    """Why each value in `args` cannot be passed to `checker` (its names already checked), or []."""
    try:
        hints = typing.get_type_hints(checker.fn)
    except (NameError, TypeError):  # an annotation that does not resolve: only the bounds are checked
        hints = {}
    problems = []
    for name, value in args.items():
        why = _value_problem(name, value, hints.get(name))
        if why:
            problems.append(f"checker {checker.name!r}: {name}: {why}")
    return problems


def _value_problem(name: str, value, kind) -> str | None:
    """Why `value` does not fit the annotation `kind` or the parameter's bound, or None."""
    checked = value
    if kind in CHECKED_TYPES:
        try:
            checked = TypeAdapter(kind).validate_python(value)  # as the checker reads it: "2.5" is 2.5
        except ValidationError:
            return f"expected {_article(kind)}, got {value!r}"
    if name in BOUNDS and isinstance(checked, (int, float)) and not isinstance(checked, bool):
        low, inclusive = BOUNDS[name]
        if math.isnan(checked) or checked < low or (checked == low and not inclusive):
            return f"must be {'at least' if inclusive else 'greater than'} {low:g}, got {value!r}"
    return None


def _article(kind) -> str:
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[kind]
