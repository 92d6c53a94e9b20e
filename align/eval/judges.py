"""The judge and the opponent of the hook's reward and win-rate metrics, each loaded once per process.

Reward and win rate need a judge: a reward entry (`eval.reward_model`), or a causal LM that answers a rubric
(`eval.judge`, `align.rewards.judge`; its weights shared with a PPO judge term of the same model). Either is
a `Judge`: `score(prompt_rows, generations) -> list[float]`. Win rate compares each response
with the opponent's response to the same prompt (`eval.against`, default the recipe's base): a higher
score wins, equal scores (or identical responses) tie and count half, so a model against itself is 0.5.
Both may name a stage of the recipe, which has no entry until it runs: until then those metrics are
skipped, with a note, rather than failing the stage that evaluates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from align.data.tokenize import encode_prompt
from align.models.generation import Generated, generate
from align.registry.fingerprint import hash_json

log = logging.getLogger(__name__)


class Judge(Protocol):
    """What scores the hook's responses: `ref` names it in fingerprints and reports."""

    ref: str

    def score(self, prompt_rows: list[dict], generations: list[Generated]) -> list[float]: ...


@dataclass
class RewardModelJudge:
    """A reward model that scores responses."""

    ref: str
    model: object
    tokenizer: object
    batch_size: int = 16

    def score(self, prompt_rows: list[dict], generations: list[Generated]) -> list[float]:
        from align.rewards.scoring import score_conversations

        conversations = [row["messages"] + [{"role": "assistant", "content": g.text}]
                         for row, g in zip(prompt_rows, generations)]
        return score_conversations(self.model, self.tokenizer, conversations, self.batch_size)


@dataclass
class LanguageModelJudge:
    """A causal LM that judges responses against a rubric (`align.rewards.judge.GenerativeJudge`)."""

    judge: object

    @property
    def ref(self) -> str:
        return self.judge.ref

    @property
    def batch_size(self) -> int:
        return self.judge.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.judge.batch_size = value

    def score(self, prompt_rows: list[dict], generations: list[Generated]) -> list[float]:
        return self.judge.score(prompt_rows, [g.text for g in generations])


@dataclass
class Opponent:
    """The responses win rate compares against, to the same prompts with the same settings."""

    ref: str
    generations: list[Generated]


def needs_judge(settings) -> bool:
    return "reward" in settings.metrics or "win_rate" in settings.metrics


def resolve_eval_ref(recipe, ref: str, registry):
    """What an eval setting names: `base` (the recipe's base), a stage of the recipe (its latest entry, or None
    while it has none), or any model ref."""
    from align.models.loading import ModelSource, materialize, resolve_model_ref

    if ref in ("base", "@base"):
        return materialize(resolve_model_ref(recipe.base, registry, check_hub=False), registry)
    stage = ref[1:] if ref.startswith("@") else ref
    if stage in recipe.stages:
        entry = registry.find(f"{recipe.name}/{stage}")
        return ModelSource(ref=entry.ref, kind="registry", entry=entry) if entry is not None else None
    return materialize(resolve_model_ref(ref, registry, check_hub=False), registry)


def source_label(source) -> str:
    return source.entry.ref if source.entry is not None else source.ref


_JUDGES: dict[tuple, Judge] = {}


def load_judge(source, registry, batch_size: int = 16, judge_settings=None) -> Judge:
    """A reward model as a judge, or with `judge_settings` (`eval.judge`) a causal LM answering its rubric;
    the last one loaded stays cached (every stage of a run uses the same)."""
    from align.rewards.judge import load_generative_judge
    from align.rewards.scoring import load_reward_model

    ref = source_label(source)
    key = (ref, judge_settings.rubric, judge_settings.judge_score) if judge_settings is not None else (ref,)
    if key not in _JUDGES:
        _JUDGES.clear()
        if judge_settings is not None:
            _JUDGES[key] = LanguageModelJudge(load_generative_judge(source, registry, judge_settings.rubric,
                                                                    judge_settings.judge_score, batch_size))
        else:
            model, tokenizer = load_reward_model(source, registry)
            _JUDGES[key] = RewardModelJudge(ref=ref, model=model, tokenizer=tokenizer)
    judge = _JUDGES[key]
    judge.batch_size = batch_size
    return judge


_OPPONENTS: dict[tuple, Opponent] = {}


def opponent_generations(source, registry, prompt_rows: list[dict], settings, key: str) -> Opponent:
    """The opponent's responses to the eval prompts, generated once per process for these settings."""
    from align.models.loading import load_causal_lm, load_tokenizer

    ref = source_label(source)
    if (ref, key) not in _OPPONENTS:
        tokenizer = load_tokenizer(source, registry)
        model = load_causal_lm(source, registry)
        ids = [encode_prompt(tokenizer, row["messages"]) for row in prompt_rows]
        _OPPONENTS.clear()
        _OPPONENTS[(ref, key)] = Opponent(ref, generate(model, tokenizer, ids, settings.generation, settings.batch_size))
        del model
    return _OPPONENTS[(ref, key)]


def judge_and_opponent(recipe, registry, prompt_rows, prompts_fp) -> tuple[Judge | None, Opponent | None]:
    """The judge and opponent the hook uses; a stage of this recipe not registered yet is skipped, with a note."""
    settings = recipe.eval
    key, ref = ("reward_model", settings.reward_model) if settings.judge is None else ("judge", settings.judge.judge)
    if ref is None:
        log.warning("eval metrics reward/win_rate need eval.reward_model or eval.judge; skipped")
        return None, None
    source = resolve_eval_ref(recipe, ref, registry)
    if source is None:
        log.warning("eval.%s %s has no registry entry yet; reward and win rate skipped", key, ref)
        return None, None
    judge = load_judge(source, registry, settings.batch_size, settings.judge)
    opponent = None
    if "win_rate" in settings.metrics:
        against = resolve_eval_ref(recipe, settings.against or "base", registry)
        if against is None:
            log.warning("eval.against %s has no registry entry yet; win rate skipped", settings.against)
        else:
            key = hash_json({"generation": settings.generation.model_dump(), "prompts": prompts_fp})
            opponent = opponent_generations(against, registry, prompt_rows, settings, key)
    return judge, opponent
