"""The evaluation hook: the same evaluation after every stage, so stages compare side by side.

The recipe's `eval.metrics` picks metrics (`align.eval.metrics`: the built-ins, and user code named as
`module:function` or `file.py:function`) that read what they need from an `EvalContext`. Generations are
made once per evaluation and shared by every metric that reads them. Results go into the stage's manifest,
keyed by a fingerprint of the eval settings and data (and of the judge and opponent, where used:
`align.eval.judges`), so a table across entries only compares numbers measured the same way; the user
code an evaluation ran is recorded beside them (`eval_plugins`: spec, file and content hash). The
cross-stage report is `align.pipeline.report`.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property

import torch

from align.data.tokenize import IGNORE, Encoded, encode_prompt
from align.eval.judges import Judge, Opponent, judge_and_opponent, needs_judge
from align.eval.metrics import find_metric
from align.models.generation import Generated, generate
from align.registry.fingerprint import hash_json
from align.rewards.plugins import PathResolver, is_plugin_spec, load_callable
from align.runtime.distributed import main_only


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
    resolve_path: PathResolver | None = None  # finds the files user checkers and metrics name (the recipe's)

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


def run_evaluation(ctx: EvalContext) -> dict:
    """Every configured metric; an unknown metric or unloadable user code was already refused by the plan."""
    results: dict = {}
    for name in ctx.settings.metrics:
        results.update(find_metric(name, ctx.resolve_path)(ctx))
    return results


def plugin_records(settings, resolve_path: PathResolver | None = None) -> list[dict]:
    """Spec, file and content hash of the user code among the eval checkers and metrics (loaded once)."""
    named = [("checker", n) for n in settings.checkers] + [("metric", n) for n in settings.metrics]
    return [load_callable(name, resolve_path, kind).record() for kind, name in named if is_plugin_spec(name)]


# Settings added after fingerprints were first recorded: left out of the hash while at their defaults, so
# entries evaluated before they existed keep fingerprints that match the same evaluation today.
_LATER_EVAL_DEFAULTS = {"reward_model": None, "judge": None, "against": None, "speed_prompts": 3}
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


def run_metrics(model, tokenizer, settings, prompt_rows: list[dict], loss_data: list[Encoded],
                judge: Judge | None = None, opponent: Opponent | None = None,
                resolve_path: PathResolver | None = None) -> tuple[dict, EvalContext]:
    """Every metric of `settings` on `model`; returns the metrics and the context (its generations and scores).
    `resolve_path` finds the files user checkers and metrics name (default: from the working directory)."""
    ctx = EvalContext(model=model, tokenizer=tokenizer, settings=settings, loss_data=loss_data,
                      prompt_rows=prompt_rows, checkers=list(settings.checkers), judge=judge, opponent=opponent,
                      resolve_path=resolve_path)
    start = time.perf_counter()
    metrics = run_evaluation(ctx)
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    plugins = plugin_records(settings, resolve_path)
    if plugins:  # lineage of what scored it; absent (as before) when the evaluation ran no user code
        metrics["eval_plugins"] = plugins
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
        judge, opponent = judge_and_opponent(recipe, registry or hook_registry(recipe), prompt_rows, prompts_fp)
        extra = {key: value.ref for key, value in (("reward_model", judge), ("against", opponent)) if value}
    metrics, _ = run_metrics(model, tokenizer, settings, prompt_rows, loss_data, judge, opponent,
                             recipe.resolve_path)
    metrics["eval_fingerprint"] = eval_fingerprint(settings, loss_fp, prompts_fp, extra)
    return metrics


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
