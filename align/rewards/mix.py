"""The PPO reward: a weighted sum of reward-model scores and checker scores, with per-source statistics.

Each term of a recipe's `rewards:` list becomes a `RewardTerm` that scores a batch of (prompt row, response
text) pairs. Reward models score the conversation with their own tokenizer and chat template, so a policy
and its reward model need not share one. Terms are kept apart until the weighted sum, so every step logs
what each source thought (a reward model and a checker disagreeing is worth seeing). Optional running
normalization (by the running standard deviation of the total) and clipping keep the scale stable when a
reward model's scores drift.

A term may also be a causal LM that judges each response against a rubric (`judge_term`,
`align.rewards.judge`), or user code: a checker (`align.rewards.checkers.find_checker`) or a batch reward
function in TRL's shape, called once per batch as `fn(prompts=, completions=, rows=, **args)` and
returning one number per completion (`function_term`). Keywords, as TRL passes them, so a TRL reward
function that takes `(completions, **kwargs)` works unchanged; `rows` carries every prompt row's fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from align.rewards.plugins import (PluginError, arguments_problem, as_number, call_problem, failed, load_callable,
                                   row_label, row_number, shape_problem, spec_label)

ScoreFn = Callable[[list[dict], list[str]], list[float]]


@dataclass
class RewardTerm:
    name: str
    weight: float
    score: ScoreFn


def checker_term(name: str, weight: float, args: dict, check=None) -> RewardTerm:
    """A checker's scores as a term named `name`; `check` (a built-in or user checker) defaults to the
    built-in checker of that name."""
    from align.rewards.checkers import get_checker

    check = get_checker(name) if check is None else check
    return RewardTerm(name=name, weight=weight, score=lambda rows, texts: check.scores(texts, rows, args))


FUNCTION_INPUTS = ("prompts", "completions", "rows")  # what a reward function is given, by keyword


def load_reward_function(spec: str, resolve_path=None):
    """The user's batch reward function `spec` names (`align.rewards.plugins.load_callable`); a `PluginError`
    when it does not load or cannot take `prompts`, `completions` and `rows` as keywords."""
    plugin = load_callable(spec, resolve_path, kind="reward function")
    why = shape_problem(plugin.fn, **{name: [] for name in FUNCTION_INPUTS})
    if why:
        raise PluginError(f"reward function {spec!r}: it is called as fn(prompts=..., completions=..., rows=..., "
                          f"**args), but {why}")
    return plugin


def function_args_problem(plugin, args) -> str | None:
    """Why the recipe's `args` cannot be passed to a reward function (a name align passes itself, or one its
    signature refuses or needs), or None."""
    if not isinstance(args, dict):
        return f"reward function {plugin.spec!r}: args must be a mapping of name to value, got {type(args).__name__}"
    taken = [name for name in FUNCTION_INPUTS if name in args]
    if taken:
        return (f"reward function {plugin.spec!r}: args may not set {', '.join(map(repr, taken))}; align passes "
                "those itself")
    why = (arguments_problem(plugin.fn, args, passed=FUNCTION_INPUTS)
           or call_problem(plugin.fn, **{name: [] for name in FUNCTION_INPUTS}, **args))
    return f"reward function {plugin.spec!r}: {why}" if why else None


def function_term(name: str, weight: float, plugin, args: dict) -> RewardTerm:
    """A batch reward function's scores as a term: one call per batch, one finite number back per completion."""

    def score(rows: list[dict], texts: list[str]) -> list[float]:
        prompts = [row["messages"][-1]["content"] for row in rows]  # the last user turn; `rows` has the chat
        try:
            values = plugin.fn(prompts=prompts, completions=list(texts), rows=rows, **args)
        except Exception as err:  # noqa: BLE001 - reported with the function and the rows, not as align's bug
            shown = ", ".join(str(row_number(row, i)) for i, row in enumerate(rows[:8]))
            raise failed(plugin, "reward function", err, f"on the batch of prompt rows {shown}"
                         + (", ..." if len(rows) > 8 else "")) from err
        return batch_scores(plugin, values, rows)

    return RewardTerm(name=name, weight=weight, score=score)


def batch_scores(plugin, values, rows: list[dict]) -> list[float]:
    """A reward function's return value as floats: a list (or array) of one finite number per row."""
    values = values.tolist() if hasattr(values, "tolist") else values
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or len(values) != len(rows):
        listed = hasattr(values, "__len__") and not isinstance(values, (str, bytes, dict))
        count = f"{len(values)} value(s)" if listed else f"a {type(values).__name__}"
        raise PluginError(f"reward function {plugin.spec!r} returned {count} for {len(rows)} completions; it "
                          "must return a list of one number per completion")
    return [as_number(plugin, "reward function", value, f"for {row_label(row, i)}")
            for i, (value, row) in enumerate(zip(values, rows))]


def reward_model_term(name: str, weight: float, model, tokenizer, batch_size: int = 16,
                      max_length: int = 1024) -> RewardTerm:
    from align.rewards.scoring import score_conversations

    def score(rows: list[dict], texts: list[str]) -> list[float]:
        conversations = [row["messages"] + [{"role": "assistant", "content": text}] for row, text in zip(rows, texts)]
        return score_conversations(model, tokenizer, conversations, batch_size, max_length)

    return RewardTerm(name=name, weight=weight, score=score)


def judge_term(name: str, weight: float, judge) -> RewardTerm:
    """A generative judge's scores (`align.rewards.judge.GenerativeJudge`) as a term."""
    return RewardTerm(name=name, weight=weight, score=judge.score)


class RunningMoments:
    """Running mean and variance over every value seen (Chan et al.'s parallel update), checkpointable."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


class RewardMix:
    """Scores responses with every term; returns the weighted total [B] and each term's raw scores."""

    def __init__(self, terms: list[RewardTerm], normalize: bool = False, clip: float | None = None):
        self.terms, self.normalize, self.clip = terms, normalize, clip
        self.moments = RunningMoments()

    def __call__(self, rows: list[dict], texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, per_source = self.raw(rows, texts)
        if self.normalize:  # moments over every process's responses, so all processes scale alike
            from align.runtime.distributed import gather_cat

            self.moments.update(gather_cat(total))
            total = (total - self.moments.mean) / max(self.moments.std, 1e-6)
        if self.clip is not None:
            total = total.clamp(-self.clip, self.clip)
        return total, per_source

    def raw(self, rows: list[dict], texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total without normalization or clipping (held-out evaluation: comparable across runs)."""
        per_source = {t.name: torch.tensor(t.score(rows, texts), dtype=torch.float32) for t in self.terms}
        total = torch.zeros(len(texts), dtype=torch.float32)
        for term in self.terms:
            total += term.weight * per_source[term.name]
        return total, per_source

    def state_dict(self) -> dict:
        return {"moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state["moments"])


def term_names(sources) -> list[str]:
    """A unique, readable name per recipe reward source: the checker's name, the user function's own name
    (`pkg.mod:is_polite` -> `is_polite`), `reward:<ref>` or `judge:<ref>`, numbered when one appears twice
    (two regex checkers with different patterns, one judge with two rubrics)."""
    names, seen = [], {}
    for source in sources:
        code = source.checker if source.checker is not None else getattr(source, "function", None)
        judge = getattr(source, "judge", None)
        name = spec_label(code) if code is not None else f"judge:{judge}" if judge is not None \
            else f"reward:{source.model}"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names
