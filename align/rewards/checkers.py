"""Verifiable checkers: plain functions from (completion, row, **args) to a score in [0, 1].

Checkers register by name with `@checker("name")`, so recipes and the evaluation hook pick them by name
and new ones plug in without an if/else chain. A checker never raises on malformed output: anything it
cannot parse scores 0.0, its lowest score. `needs` lists the row fields a checker requires, so a prompt
set without answers is refused at plan time rather than scored zero silently.

Recipes may pass per-checker arguments (`{checker: regex, args: {pattern: "^####"}}`); they reach the
function as keyword arguments. A checker declares the names it accepts in `params` and the ones that
must be given in `required`, so `Checker.args_problem` can refuse a misspelt or missing argument (or a
regex that does not compile) at plan time instead of every completion scoring 0.0 at run time.

A recipe may also name its own checker, `package.module:function` or `file.py:function`, with the same
signature (`align.rewards.plugins`); `find_checker` returns either kind. User code is not held to "never
raise": its errors and non-numbers stop the run with a message naming the function and the row, since a
bug scored as 0.0 would look like a policy that learned nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from align.rewards.plugins import (PathResolver, Plugin, PluginError, arguments_problem, as_number, call_problem,
                                   failed, is_plugin_spec, load_callable, row_label, shape_problem)
from align.rewards.sandbox import run_tests

CheckFn = Callable[..., float]


@dataclass(frozen=True)
class Checker:
    name: str
    fn: CheckFn
    needs: tuple[str, ...]
    doc: str
    params: tuple[str, ...] = ()
    required: tuple[str, ...] = ()

    def __call__(self, completion: str, row: dict, **args: Any) -> float:
        try:
            score = float(self.fn(completion if isinstance(completion, str) else "", row, **args))
        except Exception:  # noqa: BLE001 - a checker's contract is "never raise"
            return 0.0
        return score if math.isfinite(score) else 0.0

    def scores(self, completions: list[str], rows: list[dict], args: dict) -> list[float]:
        """Each completion's score (the same call for built-in and user checkers: `PluginChecker.scores`)."""
        return [self(completion, row, **args) for completion, row in zip(completions, rows)]

    def args_problem(self, args: dict | None) -> str | None:
        """Why `args` cannot be passed to this checker, or None; checked at plan time so a typo fails loudly."""
        args = {} if args is None else args
        if not isinstance(args, dict):
            return f"checker {self.name!r}: args must be a mapping of name to value, got {type(args).__name__}"
        unknown = [name for name in args if name not in self.params]
        if unknown:
            accepted = ", ".join(self.params) if self.params else "none"
            return (f"checker {self.name!r} does not accept argument(s) {', '.join(map(repr, unknown))}; "
                    f"accepted: {accepted}")
        missing = [name for name in self.required if name not in args]
        if missing:
            return f"checker {self.name!r} needs argument(s) {', '.join(map(repr, missing))}"
        if "pattern" in self.params and "pattern" in args:
            try:
                re.compile(args["pattern"])
            except (re.error, TypeError) as err:
                return f"checker {self.name!r}: pattern {args['pattern']!r} does not compile: {err}"
        return None


CHECKERS: dict[str, Checker] = {}


def checker(name: str, needs: tuple[str, ...] = (), params: tuple[str, ...] = (), required: tuple[str, ...] = ()):
    """Register `fn` under `name`; `params` are the keyword args it accepts, `required` those it cannot go without."""
    if not set(required) <= set(params):
        raise ValueError(f"checker {name!r}: required args {sorted(set(required) - set(params))} are not in params")

    def register(fn: CheckFn) -> CheckFn:
        CHECKERS[name] = Checker(name=name, fn=fn, needs=tuple(needs), doc=(fn.__doc__ or "").strip(),
                                 params=tuple(params), required=tuple(required))
        return fn

    return register


def fields_needed(names) -> dict[str, tuple[str, ...]]:
    """For each known checker name, the row fields it reads (unknown names are reported elsewhere)."""
    return {name: CHECKERS[name].needs for name in names if name in CHECKERS}


def get_checker(name: str) -> Checker:
    if name not in CHECKERS:
        raise KeyError(f"unknown checker {name!r}; known: {', '.join(sorted(CHECKERS))}")
    return CHECKERS[name]


@dataclass(frozen=True)
class PluginChecker:
    """A checker of user code, called like a built-in: `fn(completion, row, **args)` -> a number."""

    plugin: Plugin

    @property
    def name(self) -> str:
        return self.plugin.spec

    @property
    def fn(self) -> CheckFn:
        return self.plugin.fn

    def __call__(self, completion: str, row: dict, **args: Any) -> float:
        return self.scores([completion], [row], args)[0]

    def scores(self, completions: list[str], rows: list[dict], args: dict) -> list[float]:
        """Each completion's score; an error or a non-number names the function and the prompt row."""
        out = []
        for index, (completion, row) in enumerate(zip(completions, rows)):
            try:
                value = self.fn(completion if isinstance(completion, str) else "", row, **args)
            except Exception as err:  # noqa: BLE001 - reported with the function and the row, not as align's bug
                raise failed(self.plugin, "checker", err, f"on {row_label(row, index)}") from err
            out.append(as_number(self.plugin, "checker", value, f"for {row_label(row, index)}"))
        return out

    def args_problem(self, args: dict | None) -> str | None:
        """Why `args` cannot be passed (its signature decides: unexpected or missing arguments), or None."""
        args = {} if args is None else args
        if not isinstance(args, dict):
            return f"checker {self.name!r}: args must be a mapping of name to value, got {type(args).__name__}"
        why = arguments_problem(self.fn, args, positional=2) or call_problem(self.fn, "", {}, **args)
        return f"checker {self.name!r}: {why}" if why else None


def find_checker(name: str, resolve_path: PathResolver | None = None) -> Checker | PluginChecker:
    """The built-in checker `name`, or the user's checker a `module:function` / `file.py:function` names
    (`resolve_path` finds a relative file). Raises KeyError for an unknown name, `PluginError` for user code
    that does not load or cannot take (completion, row)."""
    if not is_plugin_spec(name):
        return get_checker(name)
    plugin = load_callable(name, resolve_path, kind="checker")
    why = shape_problem(plugin.fn, "", {})
    if why:
        raise PluginError(f"checker {name!r}: a checker is called as fn(completion, row, **args), but {why}")
    return PluginChecker(plugin)


# ------------------------------------------------------------------------------------------ math

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def parse_number(text: str) -> float | None:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(text)
    except ValueError:
        frac = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", text)
        if frac and int(frac.group(2)) != 0:
            return int(frac.group(1)) / int(frac.group(2))
        return None


def extract_final_answer(text: str) -> str | None:
    """The model's final answer: after `####`, inside `\\boxed{}`, after 'answer is', else the last number."""
    if not isinstance(text, str):
        return None
    for pattern in (rf"####\s*({_NUMBER})", rf"\\boxed\{{\s*({_NUMBER})\s*\}}",
                    rf"[Aa]nswer(?:\s+is)?\s*[:=]?\s*({_NUMBER})"):
        found = re.findall(pattern, text)
        if found:
            return found[-1]
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def reference_answer(row: dict) -> float | None:
    answer = row.get("answer")
    if answer is None:
        return None
    if isinstance(answer, (int, float)):
        return float(answer)
    extracted = extract_final_answer(str(answer))
    return parse_number(extracted) if extracted is not None else None


@checker("math_answer", needs=("answer",), params=("tolerance",))
def math_answer(completion: str, row: dict, tolerance: float = 1e-6) -> float:
    """1.0 when the final number in the completion equals the row's `answer` (relative `tolerance`, 1e-6)."""
    expected = reference_answer(row)
    found = extract_final_answer(completion)
    if expected is None or found is None:
        return 0.0
    value = parse_number(found)
    if value is None:
        return 0.0
    return 1.0 if math.isclose(value, expected, rel_tol=float(tolerance), abs_tol=1e-9) else 0.0


@checker("answer_format")
def answer_format(completion: str, row: dict) -> float:
    """1.0 when the completion states a final answer as `#### <number>`."""
    return 1.0 if re.search(rf"####\s*{_NUMBER}", completion) else 0.0


@checker("exact_match", needs=("answer",))
def exact_match(completion: str, row: dict) -> float:
    """1.0 when the stripped completion equals the row's `answer` exactly."""
    return 1.0 if completion.strip() == str(row["answer"]).strip() else 0.0


# ------------------------------------------------------------------------------------------ format

@checker("regex", params=("pattern", "full"), required=("pattern",))
def regex(completion: str, row: dict, pattern: str, full: bool = False) -> float:
    """1.0 when `pattern` occurs in the completion (`full: true`: matches the whole stripped completion)."""
    if full:
        return 1.0 if re.fullmatch(pattern, completion.strip()) else 0.0
    return 1.0 if re.search(pattern, completion) else 0.0


# A fenced block: its language tag and its body. An unclosed last fence (a truncated generation) still counts.
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def fenced_blocks(text: str, languages: tuple[str, ...]) -> list[str]:
    """Bodies of the ``` fenced blocks whose language tag (lower-cased, "" for none) is in `languages`."""
    return [body for lang, body in _FENCE.findall(text) if lang.lower() in languages]


@checker("json_valid", params=("required_keys",))
def json_valid(completion: str, row: dict, required_keys: list[str] | None = None) -> float:
    """1.0 when the completion (or its last ```json block) is JSON; `required_keys` must be top-level keys."""
    candidates = [completion.strip()] + [body.strip() for body in reversed(fenced_blocks(completion, ("json", "")))]
    for text in candidates:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if not required_keys:
            return 1.0
        keys = [required_keys] if isinstance(required_keys, str) else list(required_keys)
        return 1.0 if isinstance(value, dict) and all(key in value for key in keys) else 0.0
    return 0.0


# ------------------------------------------------------------------------------------------ code

def extract_code(completion: str) -> str:
    """The last ```python (or untagged ```) block of the completion, else the whole completion."""
    blocks = fenced_blocks(completion, ("python", "python3", "py", ""))
    return blocks[-1] if blocks else completion


@checker("python_tests", needs=("tests",), params=("timeout", "memory_mb", "partial"))
def python_tests(completion: str, row: dict, timeout: float = 5.0, memory_mb: float = 512,
                 partial: bool = False) -> float:
    """1.0 when the completion's code passes the row's `tests` (asserts), run in a process of their own
    against the code's objects (`align.rewards.sandbox`), `timeout` seconds and `memory_mb` each;
    `partial: true` with a list of tests scores the share that passes, each test with its own time
    (the code loads once: they share its state, and one that hangs it fails the rest)."""
    tests = row["tests"]
    if isinstance(tests, str):
        tests = [tests]
    tests = [t for t in tests if isinstance(t, str) and t.strip()]
    if not tests:  # nothing to verify: passing vacuously would reward any output
        return 0.0
    blocks = tests if partial else ["\n\n".join(tests)]
    verdict = run_tests(extract_code(completion), blocks, float(timeout), float(memory_mb))
    return sum(verdict.passed) / len(blocks)
