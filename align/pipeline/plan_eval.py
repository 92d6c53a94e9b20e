"""The plan's checks of the `eval` section: metrics, checkers and user code, and the models it names."""

from __future__ import annotations

import logging

from align.config.recipe import broken_keys
from align.data.io import check_source, is_hub_dataset, read_rows, spec_options
from align.errors import AlignError, Problem
from align.eval.metrics import METRICS, find_metric
from align.pipeline.plan_data import check_prompt_rows
from align.pipeline.plan_models import check_judge, is_reward_stage, resolve_ref
from align.rewards.arguments import checker_problems
from align.rewards.checkers import CHECKERS, fields_needed
from align.rewards.plugins import PluginError, is_plugin_spec

log = logging.getLogger(__name__)


def check_eval(recipe, problems: list[Problem], bad: set[str] = frozenset()) -> None:
    """The hook's metric and checker names and its prompt file; `bad`: eval keys that failed validation, whose
    checks are left out."""
    settings = recipe.eval
    for i, name in enumerate(settings.metrics if "metrics" not in bad else []):
        if is_plugin_spec(name):  # user code: it loads and takes the evaluation context
            try:
                find_metric(name, recipe.resolve_path)
            except PluginError as err:
                problems.append(Problem(f"eval.metrics[{i}]", str(err)))
        elif name not in METRICS:
            problems.append(Problem(f"eval.metrics[{i}]", f"unknown metric {name!r}; known: {', '.join(METRICS)}"))
    for i, name in enumerate(settings.checkers if "checkers" not in bad else []):
        if is_plugin_spec(name):  # user code: it loads and takes (completion, row) with no args
            problems += checker_problems(name, {}, f"eval.checkers[{i}]", f"eval.checkers[{i}]", recipe.resolve_path)
        elif name not in CHECKERS:
            problems.append(Problem(f"eval.checkers[{i}]", f"unknown checker {name!r}; known: {', '.join(sorted(CHECKERS))}"))
    if "prompts" in bad:
        return
    if settings.prompts is None:
        if settings.checkers and "checkers" not in bad:
            problems.append(Problem("eval.checkers", "checkers need `eval.prompts` to generate from"))
        return
    spec = settings.prompts
    if is_hub_dataset(spec.path):
        return
    path = recipe.resolve_path(spec.path)
    why = check_source(path)
    if why:
        problems.append(Problem("eval.prompts", f"{spec.path}: {why}"))
        return
    try:
        rows = read_rows(path, **spec_options(spec))
    except AlignError as err:
        problems.append(Problem("eval.prompts", str(err)))
        return
    if bad & {"checkers", "limit"}:
        return
    check_prompt_rows(rows[: settings.limit], str(spec.path), fields_needed(settings.checkers), "eval.prompts",
                     problems)


GENERATING_METRICS = ("reward", "win_rate", "length", "repetition", "speed")  # besides checkers and samples


def check_eval_models(recipe, registry, problems: list[Problem], check_hub: bool,
                       bad: set[str] = frozenset()) -> None:
    """The judge (`eval.reward_model`) and opponent (`eval.against`) the hook's reward and win-rate metrics use:
    a stage of the recipe (registered when it runs; until then those metrics are skipped) or a model ref.
    `bad`: eval keys that failed validation, whose checks are left out."""
    from align.rewards.scoring import reward_problem

    settings = recipe.eval
    metrics = settings.metrics if "metrics" not in bad else []
    generating = [m for m in metrics if m in GENERATING_METRICS]
    if generating and settings.prompts is None and "prompts" not in bad:
        problems.append(Problem("eval.prompts", f"metrics {', '.join(generating)} generate responses: set "
                                                "`eval.prompts`"))
    judged = [m for m in metrics if m in ("reward", "win_rate")]
    no_judge = settings.reward_model is None and settings.judge is None
    if judged and no_judge and not bad & {"reward_model", "judge"}:
        problems.append(Problem("eval.reward_model", f"metrics {', '.join(judged)} need a judge: set "
                                                     "`eval.reward_model` to a reward entry or reward stage, or "
                                                     "`eval.judge` to a causal LM with a rubric"))
    if settings.judge is not None and "judge" not in bad:
        for note in check_judge(recipe, settings.judge.judge, settings.judge.judge_score, "eval.judge", registry,
                                problems, check_hub, instead="use `eval.reward_model` instead of `eval.judge`"):
            log.info("eval: %s", note)
    for key, ref in (("reward_model", settings.reward_model), ("against", settings.against)):
        if ref is None or ref in ("base", "@base") or key in bad:
            continue
        stage = ref[1:] if ref.startswith("@") else ref
        if stage in broken_keys(recipe, "stages"):  # a stage too broken to plan: its own problems say why
            continue
        if stage in recipe.stages:
            kind = recipe.stages[stage].kind
            if key == "reward_model" and not is_reward_stage(recipe.stages[stage]):
                problems.append(Problem(f"eval.{key}", f"stage {stage!r} is a {kind} stage, not a reward model"))
            if key == "against" and is_reward_stage(recipe.stages[stage]):
                problems.append(Problem(f"eval.{key}", f"stage {stage!r} is a reward model, not a policy"))
            continue
        source = resolve_ref(ref, f"eval.{key}", registry, problems, check_hub, recipe)
        if source is not None and key == "reward_model":
            why = reward_problem(source)
            if why:
                problems.append(Problem(f"eval.{key}", why))
