"""The PPO reward: a weighted sum of reward-model scores and checker scores, with per-source statistics.

Each term of a recipe's `rewards:` list becomes a `RewardTerm` that scores a batch of (prompt row, response
text) pairs. Reward models score the conversation with their own tokenizer and chat template, so a policy
and its reward model need not share one. Terms are kept apart until the weighted sum, so every step logs
what each source thought (a reward model and a checker disagreeing is worth seeing). Optional running
normalization (by the running standard deviation of the total) and clipping keep the scale stable when a
reward model's scores drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

ScoreFn = Callable[[list[dict], list[str]], list[float]]


@dataclass
class RewardTerm:
    name: str
    weight: float
    score: ScoreFn


def checker_term(name: str, weight: float, args: dict) -> RewardTerm:
    from align.rewards.checkers import get_checker

    check = get_checker(name)
    return RewardTerm(name=name, weight=weight,
                      score=lambda rows, texts: [check(text, row, **args) for row, text in zip(rows, texts)])


def reward_model_term(name: str, weight: float, model, tokenizer, batch_size: int = 16,
                      max_length: int = 1024) -> RewardTerm:
    from align.rewards.scoring import score_conversations

    def score(rows: list[dict], texts: list[str]) -> list[float]:
        conversations = [row["messages"] + [{"role": "assistant", "content": text}] for row, text in zip(rows, texts)]
        return score_conversations(model, tokenizer, conversations, batch_size, max_length)

    return RewardTerm(name=name, weight=weight, score=score)


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
    """A unique, readable name per recipe reward source: the checker's name or `reward:<ref>`, numbered when
    one appears twice (two regex checkers with different patterns)."""
    names, seen = [], {}
    for source in sources:
        name = source.checker if source.checker is not None else f"reward:{source.model}"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names
