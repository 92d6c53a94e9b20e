"""Verifiable checkers: plain functions from (completion, row) to a score in [0, 1].

Checkers register by name with `@checker("name")`, so recipes and the evaluation hook pick them by name
and new ones plug in without an if/else chain. A checker never raises on malformed output: anything it
cannot parse scores 0.0, its lowest score. `needs` lists the row fields a checker requires, so a prompt
set without answers is refused at plan time rather than scored zero silently.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

CheckFn = Callable[[str, dict], float]


@dataclass(frozen=True)
class Checker:
    name: str
    fn: CheckFn
    needs: tuple[str, ...]
    doc: str

    def __call__(self, completion: str, row: dict) -> float:
        try:
            score = float(self.fn(completion if isinstance(completion, str) else "", row))
        except Exception:  # noqa: BLE001 - a checker's contract is "never raise"
            return 0.0
        return score if math.isfinite(score) else 0.0


CHECKERS: dict[str, Checker] = {}


def checker(name: str, needs: tuple[str, ...] = ()):
    def register(fn: CheckFn) -> CheckFn:
        CHECKERS[name] = Checker(name=name, fn=fn, needs=needs, doc=(fn.__doc__ or "").strip())
        return fn

    return register


def get_checker(name: str) -> Checker:
    if name not in CHECKERS:
        raise KeyError(f"unknown checker {name!r}; known: {', '.join(sorted(CHECKERS))}")
    return CHECKERS[name]


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


@checker("math_answer", needs=("answer",))
def math_answer(completion: str, row: dict) -> float:
    """1.0 when the final number in the completion equals the row's `answer` (relative tolerance 1e-6)."""
    expected = reference_answer(row)
    found = extract_final_answer(completion)
    if expected is None or found is None:
        return 0.0
    value = parse_number(found)
    if value is None:
        return 0.0
    return 1.0 if math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-9) else 0.0


@checker("answer_format")
def answer_format(completion: str, row: dict) -> float:
    """1.0 when the completion states a final answer as `#### <number>`."""
    return 1.0 if re.search(rf"####\s*{_NUMBER}", completion) else 0.0


@checker("exact_match", needs=("answer",))
def exact_match(completion: str, row: dict) -> float:
    """1.0 when the stripped completion equals the row's `answer` exactly."""
    return 1.0 if completion.strip() == str(row["answer"]).strip() else 0.0
