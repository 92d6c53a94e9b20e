"""The evaluation hook's metrics: a registry of functions from an `EvalContext` to a dict of named figures.

Built-in metrics register by name with `@metric("name")`; the recipe's `eval.metrics` picks them, and may
also name user code with the same signature (`package.module:function` or `file.py:function`, loaded by
`align.rewards.plugins`): `find_metric` returns either. A user metric must return a mapping of names to
finite numbers; anything else, or an error it raises, stops the evaluation with a message naming it.

Metrics read what they need from the context, which makes the generations once and shares them (checkers,
reward, win rate, length, repetition); `speed` makes its own, one prompt at a time, since batching hides
latency.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from typing import TYPE_CHECKING, Callable

import torch

from align.models.generation import Generated, generate
from align.rewards.checkers import find_checker
from align.rewards.plugins import (PathResolver, PluginError, as_number, call_problem, failed, is_plugin_spec, load_callable,
                                   spec_label)

if TYPE_CHECKING:
    from align.eval.hook import EvalContext

MetricFn = Callable[["EvalContext"], dict]
METRICS: dict[str, MetricFn] = {}


def metric(name: str):
    def register(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return register


def find_metric(name: str, resolve_path: PathResolver | None = None) -> MetricFn:
    """The built-in metric `name`, or the user's metric a `module:function` / `file.py:function` names
    (`resolve_path` finds a relative file). Raises KeyError for an unknown name, `PluginError` for user code
    that does not load or cannot be called with the context alone."""
    if not is_plugin_spec(name):
        if name not in METRICS:
            raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
        return METRICS[name]
    plugin = load_callable(name, resolve_path, kind="metric")
    why = call_problem(plugin.fn, None)
    if why:
        raise PluginError(f"metric {name!r}: a metric is called as fn(ctx) with the evaluation context, but {why}")

    def user_metric(ctx: "EvalContext") -> dict:
        try:
            figures = plugin.fn(ctx)
        except Exception as err:  # noqa: BLE001 - reported with the function, not as align's bug
            raise failed(plugin, "metric", err, "while evaluating") from err
        if not isinstance(figures, dict) or not all(isinstance(key, str) for key in figures):
            raise PluginError(f"metric {name!r} returned {type(figures).__name__}; it must return a mapping of "
                              "names to numbers")
        return {key: as_number(plugin, "metric", value, f"as {key!r}") for key, value in figures.items()}

    user_metric.plugin = plugin  # what the manifest records of it
    return user_metric


def checker_label(name: str, taken: set[str]) -> str:
    """The figure name of an eval checker: a built-in's name, a user checker's function name (its whole spec
    when that name is taken already)."""
    short = spec_label(name)
    return short if short == name or short not in taken else name


# ------------------------------------------------------------------------------------------ built-in metrics


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
    out, taken = {}, set(ctx.checkers)
    texts = [g.text for g in ctx.generations]
    for name in ctx.checkers:
        scores = find_checker(name, ctx.resolve_path).scores(texts, ctx.prompt_rows, {})
        label = checker_label(name, taken)
        taken.add(label)
        out[f"{label}_pass_rate"] = sum(scores) / len(scores)
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


# ------------------------------------------------------------------------------------------ the figures


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
