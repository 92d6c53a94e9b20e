"""Plan-time checks of checker argument values (`Checker.args_problem` checks their names).

A checker never raises: a value it cannot use (`tolerance: "x"`, `timeout: -1`) makes every completion
score 0.0 at run time, which looks like a policy that learned nothing. The value's type comes from the
checker function's annotation (float, int, bool and str parameters; others are left to the checker), its
range from `BOUNDS`, so a new checker gets the type check without registering anything.

`checker_problems` and `function_problems` are the plan's whole check of a reward source or eval checker:
the name is known, or the user code loads and takes what align passes (`align.rewards.plugins`), and
the `args` fit it, each problem placed at its YAML path.
"""

from __future__ import annotations

import math
import typing

from pydantic import TypeAdapter, ValidationError

from align.errors import Problem

# Parameter name -> (lower bound, whether the bound itself is allowed), for every checker that takes it.
BOUNDS: dict[str, tuple[float, bool]] = {
    "timeout": (0.0, False),     # seconds a test block may run
    "memory_mb": (0.0, False),   # address-space limit of the test process
    "tolerance": (0.0, True),    # relative tolerance of math_answer
}
CHECKED_TYPES = (float, int, bool, str)


def checker_problems(name: str, args, where: str, args_where: str, resolve_path=None) -> list[Problem]:
    """Why checker `name` (built-in, or user code) cannot score with `args`: an unknown name or code that does
    not load at `where`, a misspelt, missing or unusable argument at `args_where`."""
    from align.rewards.checkers import CHECKERS, find_checker
    from align.rewards.plugins import PluginError, is_plugin_spec

    if not is_plugin_spec(name) and name not in CHECKERS:
        return [Problem(where, f"unknown checker {name!r}; known: {', '.join(sorted(CHECKERS))}")]
    try:
        check = find_checker(name, resolve_path)
    except PluginError as err:
        return [Problem(where, str(err))]
    why = check.args_problem(args)
    if why:
        return [Problem(args_where, why)]
    return [Problem(args_where, w) for w in argument_value_problems(check, args or {})]


def function_problems(spec: str, args, where: str, args_where: str, resolve_path=None) -> list[Problem]:
    """Why the batch reward function `spec` cannot score with `args`: code that does not load or takes the
    wrong inputs at `where`, arguments it refuses or needs at `args_where`."""
    from align.rewards.mix import function_args_problem, load_reward_function
    from align.rewards.plugins import PluginError

    try:
        plugin = load_reward_function(spec, resolve_path)
    except PluginError as err:
        return [Problem(where, str(err))]
    why = function_args_problem(plugin, args)
    if why:
        return [Problem(args_where, why)]
    return [Problem(args_where, w) for w in value_problems(plugin.fn, f"reward function {spec!r}", args or {})]


def argument_value_problems(checker, args: dict) -> list[str]:
    """Why each value in `args` cannot be passed to `checker` (its names already checked), or []."""
    return value_problems(checker.fn, f"checker {checker.name!r}", args)


def value_problems(fn, label: str, args: dict) -> list[str]:
    """Why each value in `args` does not fit `fn`'s annotation of it or its bound, each led by `label`."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: only the bounds are checked
        hints = {}
    problems = []
    for name, value in args.items():
        why = _value_problem(name, value, hints.get(name))
        if why:
            problems.append(f"{label}: {name}: {why}")
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
