"""The evaluation hook: the same evaluation after every stage, so stages compare side by side.

Metrics register by name with `@metric("name")` and read what they need from an `EvalContext`; the
recipe's `eval.metrics` list picks them. Generations are made once per evaluation and shared by every
metric that reads them (checkers, reward, win rate, length, repetition); `speed` makes its own, one
prompt at a time, since batching hides latency. Results go into the stage's manifest, keyed by a
fingerprint of the eval settings and data (and of the judge and opponent, where used), so a table across
entries only compares numbers measured the same way. The cross-stage report is `align.pipeline.report`.

Reward and win rate need a judge: a reward entry (`eval.reward_model`). Win rate compares each response
with the opponent's response to the same prompt (`eval.against`, default the recipe's base): a higher
score wins, equal scores (or identical responses) tie and count half, so a model against itself is 0.5.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import statistics
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from align.data.tokenize import IGNORE, Encoded, encode_prompt
from align.runtime.distributed import main_only
from align.registry.fingerprint import hash_json
from align.models.generation import Generated, generate
from align.rewards.checkers import get_checker

log = logging.getLogger(__name__)
MetricFn = Callable[["EvalContext"], dict]
METRICS: dict[str, MetricFn] = {}


def metric(name: str):
    def register(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return register


@dataclass
class Judge:
    """A reward model that scores responses: `ref` names it in fingerprints and reports."""

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
class Opponent:
    """The responses win rate compares against, to the same prompts with the same settings."""

    ref: str
    generations: list[Generated]


@dataclass
class EvalContext:
    model: object
    tokenizer: object
    settings: object  # align.config.recipe.EvalSettings
    loss_data: list[Encoded] = field(default_factory=list)
    prompt_rows: list[dict] = field(default_factory=list)  # {"messages": [...], plus fields such as "answer"}
    checkers: list[str] = field(default_factory=list)
    judge: Judge | None = None
    opponent: Opponent | None = None

    @cached_property
    def prompt_ids(self) -> list[list[int]]:
        return [encode_prompt(self.tokenizer, row["messages"]) for row in self.prompt_rows]

    @cached_property
    def generations(self) -> list[Generated]:
        start = time.perf_counter()
        out = generate(self.model, self.tokenizer, self.prompt_ids, self.settings.generation, self.settings.batch_size)
        self.generation_seconds = time.perf_counter() - start
        return out

    @cached_property
    def mean_nll(self) -> float | None:
        """Computed once for both `loss` and `perplexity`."""
        if not self.loss_data:
            return None
        return _mean_nll(self.model, self.loss_data, self.tokenizer.pad_token_id, self.settings.batch_size)

    @cached_property
    def reward_scores(self) -> list[float]:
        return self.judge.score(self.prompt_rows, self.generations)

    @cached_property
    def opponent_scores(self) -> list[float]:
        return self.judge.score(self.prompt_rows, self.opponent.generations)


@metric("loss")
def eval_loss(ctx: EvalContext) -> dict:
    return {} if ctx.mean_nll is None else {"eval_loss": ctx.mean_nll}


@metric("perplexity")
def perplexity(ctx: EvalContext) -> dict:
    return {} if ctx.mean_nll is None else {"perplexity": math.exp(min(ctx.mean_nll, 50.0))}


@metric("checkers")
def checker_scores(ctx: EvalContext) -> dict:
    if not ctx.prompt_rows or not ctx.checkers:
        return {}
    out = {}
    for name in ctx.checkers:
        check = get_checker(name)
        scores = [check(g.text, row) for g, row in zip(ctx.generations, ctx.prompt_rows)]
        out[f"{name}_pass_rate"] = sum(scores) / len(scores)
    lengths = [len(g.token_ids) for g in ctx.generations]
    out["response_tokens_mean"] = sum(lengths) / len(lengths)
    out["eos_rate"] = sum(g.ended_with_eos for g in ctx.generations) / len(lengths)
    out["generation_tokens_per_s"] = sum(lengths) / max(getattr(ctx, "generation_seconds", 0.0), 1e-9)
    return out


@metric("samples")
def samples(ctx: EvalContext) -> dict:
    if not ctx.prompt_rows or ctx.settings.samples == 0:
        return {}
    shown = []
    for row, gen in list(zip(ctx.prompt_rows, ctx.generations))[: ctx.settings.samples]:
        shown.append({"prompt": row["messages"][-1]["content"], "response": gen.text})
    return {"samples": shown}


@metric("reward")
def reward(ctx: EvalContext) -> dict:
    """The judge's scores of the responses: mean, spread and range."""
    if not ctx.prompt_rows or ctx.judge is None:
        return {}
    scores = ctx.reward_scores
    return {"reward_mean": statistics.fmean(scores), "reward_std": statistics.pstdev(scores),
            "reward_min": min(scores), "reward_max": max(scores)}


@metric("win_rate")
def win_rate_metric(ctx: EvalContext) -> dict:
    """Share of prompts where the judge scores this model's response above the opponent's (ties: half)."""
    if not ctx.prompt_rows or ctx.judge is None or ctx.opponent is None:
        return {}
    same = [a.token_ids == b.token_ids for a, b in zip(ctx.generations, ctx.opponent.generations)]
    result = win_rate(ctx.reward_scores, ctx.opponent_scores, same)
    return {**result, "win_rate_against": ctx.opponent.ref}


@metric("length")
def length(ctx: EvalContext) -> dict:
    if not ctx.prompt_rows:
        return {}
    tokens = [len(g.token_ids) for g in ctx.generations]
    return {"response_tokens_mean": statistics.fmean(tokens), "response_tokens_max": max(tokens),
            "response_chars_mean": statistics.fmean(len(g.text) for g in ctx.generations),
            "eos_rate": sum(g.ended_with_eos for g in ctx.generations) / len(tokens)}


@metric("repetition")
def repetition(ctx: EvalContext) -> dict:
    """distinct-n (Li et al., 2016): distinct word n-grams over all n-grams of all responses; low = repetitive."""
    if not ctx.prompt_rows:
        return {}
    texts = [g.text for g in ctx.generations]
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}


@metric("speed")
def speed(ctx: EvalContext) -> dict:
    if not ctx.prompt_rows:
        return {}
    return measure_speed(ctx.model, ctx.tokenizer, ctx.prompt_ids[: ctx.settings.speed_prompts],
                         ctx.settings.generation)


def win_rate(scores: list[float], against: list[float], same: list[bool] | None = None,
             tie_tolerance: float = 1e-4) -> dict:
    """Win rate of `scores` over `against` (pairwise, same prompts): wins count 1, ties 1/2. Scores within
    `tie_tolerance` tie, and so do responses marked `same` (identical responses always tie, whatever
    rounding a batched pass adds to their scores)."""
    if len(scores) != len(against):
        raise ValueError(f"win rate needs responses to the same prompts ({len(scores)} vs {len(against)})")
    if not scores:
        return {}
    same = same or [False] * len(scores)
    wins = ties = 0
    for a, b, identical in zip(scores, against, same):
        if identical or abs(a - b) <= tie_tolerance:
            ties += 1
        elif a > b:
            wins += 1
    return {"win_rate": (wins + 0.5 * ties) / len(scores), "win_rate_wins": wins, "win_rate_ties": ties,
            "win_rate_losses": len(scores) - wins - ties}


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams, over every text (0.0 when there are none)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def response_hash(generated: Generated) -> str:
    return hashlib.sha256(repr(generated.token_ids).encode()).hexdigest()[:12]


class _TokenClock:
    """A transformers streamer (`put`/`end`) that records when each new token arrives (the first `put` is
    the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def measure_speed(model, tokenizer, prompt_ids: list[list[int]], settings) -> dict:
    """Latency and throughput of one request at a time, after one untimed warm-up: time to first token
    (prefill and the first step), time per output token after the first, and output tokens per second
    from the call to the last token. Token arrival times come from a streamer; beam search cannot stream,
    so there the first step is timed by a separate one-token call."""
    if not prompt_ids:
        return {}
    generate(model, tokenizer, prompt_ids[:1], settings.model_copy(update={"max_new_tokens": 2, "min_new_tokens": 0}), 1)
    first_times, decode_seconds, decode_tokens, seconds, tokens = [], 0.0, 0, 0.0, 0
    for ids in prompt_ids:
        if getattr(settings, "num_beams", 1) > 1:
            start = time.perf_counter()
            generate(model, tokenizer, [ids], settings.model_copy(update={"max_new_tokens": 1, "min_new_tokens": 0}), 1)
            first = time.perf_counter() - start
            start = time.perf_counter()
            [out] = generate(model, tokenizer, [ids], settings, 1)
            total, count = time.perf_counter() - start, len(out.token_ids)
        else:
            clock = _TokenClock()
            start = time.perf_counter()
            generate(model, tokenizer, [ids], settings, 1, streamer=clock)
            first, total, count = clock.times[0] - start, clock.times[-1] - start, len(clock.times)
        first_times.append(first)
        decode_seconds += max(total - first, 0.0)
        decode_tokens += count - 1
        seconds += total
        tokens += count
    return {"time_to_first_token_s": statistics.fmean(first_times),
            "time_per_output_token_s": decode_seconds / decode_tokens if decode_tokens else None,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "speed_tokens": tokens, "speed_seconds": seconds, "speed_prompts": len(prompt_ids)}


def run_evaluation(ctx: EvalContext) -> dict:
    """Every configured metric; an unknown metric name was already refused when the recipe was planned."""
    results: dict = {}
    for name in ctx.settings.metrics:
        results.update(METRICS[name](ctx))
    return results


# Settings added after fingerprints were first recorded: left out of the hash while at their defaults, so
# entries evaluated before they existed keep fingerprints that match the same evaluation today.
_LATER_EVAL_DEFAULTS = {"reward_model": None, "against": None, "speed_prompts": 3}
_LATER_GENERATION_DEFAULTS = {"min_new_tokens": 0, "num_beams": 1, "repetition_penalty": 1.0,
                              "presence_penalty": 0.0, "frequency_penalty": 0.0}


def fingerprint_settings(settings) -> dict:
    dump = settings.model_dump()
    for key, default in _LATER_EVAL_DEFAULTS.items():
        if dump.get(key, default) == default:
            dump.pop(key, None)
    generation = dump.get("generation") or {}
    for key, default in _LATER_GENERATION_DEFAULTS.items():
        if generation.get(key, default) == default:
            generation.pop(key, None)
    return dump


def eval_fingerprint(settings, loss_fingerprint: str | None, prompts_fingerprint: str | None,
                     extra: dict | None = None) -> str:
    """How an evaluation was made: settings, loss data, prompts and (`extra`) the judge and opponent refs."""
    value = {"settings": fingerprint_settings(settings), "loss": loss_fingerprint, "prompts": prompts_fingerprint}
    if extra:
        value["extra"] = extra
    return hash_json(value)


@torch.no_grad()
def _mean_nll(model, data: list[Encoded], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean negative log-likelihood over labelled tokens. Batches are length-sorted and the
    LM head is projected at labelled positions only (`align.models.logprobs`), in fp32 like the trunk."""
    from align.data.sampling import length_sorted_chunks, pad_right
    from align.models.logprobs import sequence_logps

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in length_sorted_chunks([len(e.input_ids) for e in data], batch_size):
        ids, mask = pad_right([data[i].input_ids for i in chunk], pad_id)
        labels, _ = pad_right([data[i].labels for i in chunk], IGNORE)
        sums, counts = sequence_logps(model, ids.to(device), mask.to(device), labels.to(device))
        total -= float(sums.double().sum())
        count += int(counts.sum())
    if was_training:
        model.train()
    return total / max(count, 1)


def load_eval_prompts(recipe) -> tuple[list[dict], str | None]:
    """Rows of the recipe's `eval.prompts`, each with `messages` (the prompt as chat) and its other fields."""
    from align.data.io import fingerprint, read_rows, spec_options
    from align.data.prompts import prompt_messages

    spec = recipe.eval.prompts
    if spec is None:
        return [], None
    path = recipe.resolve_path(spec.path) if not spec.path.startswith("hf:") else spec.path
    rows = read_rows(path, **spec_options(spec))[: recipe.eval.limit]
    return [{**row, "messages": prompt_messages(row)} for row in rows], fingerprint(path, rows)


_REGISTRY: ContextVar = ContextVar("align_evaluation_registry", default=None)


@contextlib.contextmanager
def evaluation_registry(registry):
    """The registry the hook resolves `eval.reward_model` and `eval.against` in, while stages run."""
    token = _REGISTRY.set(registry)
    try:
        yield
    finally:
        _REGISTRY.reset(token)


def hook_registry(recipe):
    from align.registry.store import Registry

    registry = _REGISTRY.get()
    if registry is not None:
        return registry
    return Registry(recipe.registry) if recipe.registry else Registry()


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


_JUDGES: dict[str, Judge] = {}


def load_judge(source, registry, batch_size: int = 16) -> Judge:
    """A reward model as a judge; the last one loaded stays cached (every stage of a run uses the same)."""
    from align.rewards.scoring import load_reward_model

    ref = source_label(source)
    if ref not in _JUDGES:
        _JUDGES.clear()
        model, tokenizer = load_reward_model(source, registry)
        _JUDGES[ref] = Judge(ref=ref, model=model, tokenizer=tokenizer)
    judge = _JUDGES[ref]
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


def needs_judge(settings) -> bool:
    return "reward" in settings.metrics or "win_rate" in settings.metrics


def run_metrics(model, tokenizer, settings, prompt_rows: list[dict], loss_data: list[Encoded],
                judge: Judge | None = None, opponent: Opponent | None = None) -> tuple[dict, EvalContext]:
    """Every metric of `settings` on `model`; returns the metrics and the context (its generations and scores)."""
    ctx = EvalContext(model=model, tokenizer=tokenizer, settings=settings, loss_data=loss_data,
                      prompt_rows=prompt_rows, checkers=list(settings.checkers), judge=judge, opponent=opponent)
    start = time.perf_counter()
    metrics = run_evaluation(ctx)
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    return metrics, ctx


@main_only  # under several processes: main measures, the others wait and get its figures
def evaluate_model(recipe, model, tokenizer, fallback_loss: list[Encoded] | None = None, *, registry=None) -> dict:
    """The hook every stage calls: the recipe's eval metrics on `model`, with the fingerprint of how."""
    from align.data.prepare import load_demonstrations, tokenize_all

    settings = recipe.eval
    prompt_rows, prompts_fp = load_eval_prompts(recipe)
    loss_data = fallback_loss or []
    loss_fp = hash_json([e.input_ids for e in loss_data]) if loss_data else None
    if settings.data is not None:
        conversations, report = load_demonstrations(recipe, settings.data)
        loss_data = tokenize_all(tokenizer, conversations.rows, 4096, True, report, str(settings.data.path),
                                 conversations.kept_index)
        loss_fp = report.fingerprint
    judge, opponent, extra = None, None, {}
    if prompt_rows and needs_judge(settings):
        judge, opponent = _hook_judge_and_opponent(recipe, registry or hook_registry(recipe), prompt_rows, prompts_fp)
        extra = {key: value.ref for key, value in (("reward_model", judge), ("against", opponent)) if value}
    metrics, _ = run_metrics(model, tokenizer, settings, prompt_rows, loss_data, judge, opponent)
    metrics["eval_fingerprint"] = eval_fingerprint(settings, loss_fp, prompts_fp, extra)
    return metrics


def _hook_judge_and_opponent(recipe, registry, prompt_rows, prompts_fp):
    """The judge and opponent the hook uses; a stage of this recipe not registered yet is skipped, with a note."""
    settings = recipe.eval
    if settings.reward_model is None:
        log.warning("eval metrics reward/win_rate need eval.reward_model; skipped")
        return None, None
    source = resolve_eval_ref(recipe, settings.reward_model, registry)
    if source is None:
        log.warning("eval.reward_model %s has no registry entry yet; reward and win rate skipped",
                    settings.reward_model)
        return None, None
    judge = load_judge(source, registry, settings.batch_size)
    opponent = None
    if "win_rate" in settings.metrics:
        against = resolve_eval_ref(recipe, settings.against or "base", registry)
        if against is None:
            log.warning("eval.against %s has no registry entry yet; win rate skipped", settings.against)
        else:
            key = hash_json({"generation": settings.generation.model_dump(), "prompts": prompts_fp})
            opponent = opponent_generations(against, registry, prompt_rows, settings, key)
    return judge, opponent


@main_only
def evaluate_reward_model(model, pairs, pad_id: int, batch_size: int = 16) -> tuple[dict, tuple[list, list]]:
    """The hook for reward entries: held-out pairwise accuracy, ties, score mean and spread, and the gap.
    Returns the metrics and the (chosen, rejected) scores for the histogram."""
    from align.rewards.scoring import pair_metrics, score_pairs

    start = time.perf_counter()
    chosen, rejected = score_pairs(model, pairs, pad_id, batch_size)
    metrics = pair_metrics(chosen, rejected)
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    metrics["eval_fingerprint"] = hash_json([[p.chosen.input_ids, p.rejected.input_ids] for p in pairs])
    return metrics, (chosen, rejected)
