"""The PPO stage's reward mix, built from the recipe's `rewards:`: reward models, checkers, user reward
functions and generative judges, each loaded once, and how the manifest records each (so lineage shows what
scored the run). A source naming a stage of this recipe takes that stage's latest entry."""

from __future__ import annotations

import torch

from align.errors import RegistryError
from align.rewards.checkers import PluginChecker, find_checker
from align.rewards.mix import (
    RewardMix,
    checker_term,
    function_term,
    judge_term,
    load_reward_function,
    reward_model_term,
    term_names,
)
from align.runtime import distributed
from align.stages.context import StageContext


def recipe_source(ctx: StageContext, ref: str, pull: bool = True):
    """The model a reward or judge source names: an earlier stage of this recipe (its latest entry), `base`
    (the recipe's base) or any model ref; resolved, not loaded (`pull`: the packaged model registered)."""
    from align.models.loading import materialize, resolve_model_ref

    name = ref.removeprefix("@")
    if name == "base":
        ref = ctx.recipe.base
    elif name in ctx.recipe.stages:
        entry = ctx.registry.find(f"{ctx.recipe.name}/{name}")
        if entry is None:
            raise RegistryError(f"stages.{ctx.name}.rewards: stage {name!r} has no registry entry yet; run it first")
        ref = entry.ref
    source = resolve_model_ref(ref, ctx.registry)
    return materialize(source, ctx.registry) if pull else source


def reward_entry(ctx: StageContext, ref: str):
    """The reward model a reward source names; refused when it is not a reward model or failed its quality gate
    (unless `allow_failed_gate`)."""
    from align.rewards.scoring import gate_problem, reward_problem

    source = recipe_source(ctx, ref, pull=False)
    why = reward_problem(source) or (None if ctx.config.allow_failed_gate else gate_problem(source))
    if why:
        raise RegistryError(f"stages.{ctx.name}.rewards: {why}")
    return source


def judge_source_term(ctx: StageContext, name: str, source) -> tuple[object, dict]:
    """A judge source's term (its weights shared with any other judge of the same model) and its record."""
    from align.rewards.judge import judge_problem, load_generative_judge
    from align.runtime.precision import mark, stage_precision

    model_source = recipe_source(ctx, source.judge)
    why = judge_problem(model_source)
    if why:
        raise RegistryError(f"stages.{ctx.name}.rewards: {why}")
    batch_size = source.args.get("batch_size", ctx.config.batch_size * 2)
    judge = load_generative_judge(model_source, ctx.registry, source.rubric, source.judge_score, batch_size)
    mark(judge.model, stage_precision(ctx.config))  # its passes in the stage's no-grad dtype, like the reference's
    record = {"name": name, "judge": model_source.lineage(), "rubric": source.rubric,
              "judge_score": source.judge_score, "weight": source.weight}
    return judge_term(name, source.weight, judge), record


def build_rewards(ctx: StageContext) -> tuple[RewardMix, list[dict]]:
    """The reward mix of the recipe, reward models, judges and user code loaded; and how the manifest records
    each source (user code with its spec, file and content hash; a judge with its model and rubric)."""
    from align.rewards.scoring import load_reward_model

    cfg = ctx.config
    terms, recorded = [], []
    for name, source in zip(term_names(cfg.rewards), cfg.rewards):
        if source.checker is not None:
            check = find_checker(source.checker, ctx.recipe.resolve_path)
            terms.append(checker_term(name, source.weight, source.args, check))
            recorded.append({"name": name, "checker": source.checker, "args": source.args, "weight": source.weight,
                             **({"plugin": check.plugin.record()} if isinstance(check, PluginChecker) else {})})
            continue
        if source.function is not None:
            plugin = load_reward_function(source.function, ctx.recipe.resolve_path)
            terms.append(function_term(name, source.weight, plugin, source.args))
            recorded.append({"name": name, "function": source.function, "args": source.args,
                             "weight": source.weight, "plugin": plugin.record()})
            continue
        if source.judge is not None:
            term, record = judge_source_term(ctx, name, source)
            terms.append(term)
            recorded.append(record)
            continue
        model_source = reward_entry(ctx, source.model)
        model, tokenizer = load_reward_model(model_source, ctx.registry)
        if torch.cuda.is_available():
            model.to(distributed.device())
        terms.append(reward_model_term(name, source.weight, model, tokenizer, cfg.batch_size * 2, cfg.max_length))
        recorded.append({"name": name, "model": model_source.lineage(), "weight": source.weight})
    return RewardMix(terms, normalize=cfg.reward_normalize, clip=cfg.reward_clip), recorded
