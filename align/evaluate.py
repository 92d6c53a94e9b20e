"""The evaluation hook: the same evaluation after every stage, so stages compare side by side.

Metrics register by name with `@metric("name")` and read what they need from an `EvalContext`; the
recipe's `eval.metrics` list picks them. Generations are made once per evaluation and shared by every
metric that reads them. Results go into the stage's manifest, keyed by a fingerprint of the eval settings
and data, so a table across entries only compares numbers measured the same way.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from align.data.tokenize import IGNORE, Encoded, encode_prompt
from align.fingerprint import hash_json
from align.generation import Generated, generate
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
class EvalContext:
    model: object
    tokenizer: object
    settings: object  # align.recipe.EvalSettings
    loss_data: list[Encoded] = field(default_factory=list)
    prompt_rows: list[dict] = field(default_factory=list)  # {"messages": [...], plus fields such as "answer"}
    checkers: list[str] = field(default_factory=list)

    @cached_property
    def generations(self) -> list[Generated]:
        ids = [encode_prompt(self.tokenizer, row["messages"]) for row in self.prompt_rows]
        start = time.perf_counter()
        out = generate(self.model, self.tokenizer, ids, self.settings.generation, self.settings.batch_size)
        self.generation_seconds = time.perf_counter() - start
        return out


@metric("loss")
def eval_loss(ctx: EvalContext) -> dict:
    if not ctx.loss_data:
        return {}
    return {"eval_loss": _mean_nll(ctx.model, ctx.loss_data, ctx.tokenizer.pad_token_id, ctx.settings.batch_size)}


@metric("perplexity")
def perplexity(ctx: EvalContext) -> dict:
    loss = eval_loss(ctx).get("eval_loss")
    return {} if loss is None else {"perplexity": math.exp(min(loss, 50.0))}


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


def run_evaluation(ctx: EvalContext) -> dict:
    """Every configured metric; an unknown metric name was already refused when the recipe was planned."""
    results: dict = {}
    for name in ctx.settings.metrics:
        results.update(METRICS[name](ctx))
    return results


def eval_fingerprint(settings, loss_fingerprint: str | None, prompts_fingerprint: str | None) -> str:
    return hash_json({"settings": settings.model_dump(), "loss": loss_fingerprint, "prompts": prompts_fingerprint})


@torch.no_grad()
def _mean_nll(model, data: list[Encoded], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean negative log-likelihood over labelled tokens. Batches are length-sorted and the
    LM head is projected at labelled positions only (`align.logprobs`), in fp32 like the trunk."""
    from align.data.sampling import length_sorted_chunks, pad_right
    from align.logprobs import sequence_logps

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
    from align.data.io import fingerprint, read_rows
    from align.data.prompts import prompt_messages

    spec = recipe.eval.prompts
    if spec is None:
        return [], None
    path = recipe.resolve_path(spec.path) if not spec.path.startswith("hf:") else spec.path
    rows = read_rows(path, split=spec.split, limit=spec.limit)[: recipe.eval.limit]
    return [{**row, "messages": prompt_messages(row)} for row in rows], fingerprint(path, rows)


def evaluate_model(recipe, model, tokenizer, fallback_loss: list[Encoded] | None = None) -> dict:
    """The hook every stage calls: the recipe's eval metrics on `model`, with the fingerprint of how."""
    from align.data.prepare import load_demonstrations, tokenize_all

    settings = recipe.eval
    prompt_rows, prompts_fp = load_eval_prompts(recipe)
    loss_data = fallback_loss or []
    loss_fp = hash_json([e.input_ids for e in loss_data]) if loss_data else None
    if settings.data is not None:
        conversations, report = load_demonstrations(recipe, settings.data)
        loss_data = tokenize_all(tokenizer, conversations.rows, 4096, True, report, str(settings.data.path))
        loss_fp = report.fingerprint
    ctx = EvalContext(model=model, tokenizer=tokenizer, settings=settings, loss_data=loss_data,
                      prompt_rows=prompt_rows, checkers=list(settings.checkers))
    start = time.perf_counter()
    metrics = run_evaluation(ctx)
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    metrics["eval_fingerprint"] = eval_fingerprint(settings, loss_fp, prompts_fp)
    return metrics


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
