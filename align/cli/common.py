"""What the `align` commands share: the registry and recipe a command names, generation flags, metric lists."""

from __future__ import annotations


def recipe_of(args, with_plan: bool = False):
    """The recipe of `args`. `with_plan` (plan, run): a recipe with schema problems is still planned as far as
    it validates, so its file, ref and data problems come in the same report."""
    from align.errors import ConfigError
    from align.config.loading import load_recipe

    try:
        return load_recipe(args.recipe, args.set or [])
    except ConfigError as err:
        if not with_plan or err.partial is None:
            raise
        from align.pipeline.plan import add_plan_problems

        raise add_plan_problems(err, registry_of(args, err.partial), args.stage) from None


def registry_of(args, recipe=None):
    """The registry a command works on: `--registry`, else the recipe's `registry:`, else the default
    ($ALIGN_REGISTRY or ./registry)."""
    from align.registry.store import Registry

    if args.registry:
        return Registry(args.registry)
    if recipe is not None and recipe.registry:
        return Registry(recipe.registry)
    return Registry()


def generation_flags(p, max_new_tokens_default: str = "the recipe's") -> None:
    """The decoding flags of `eval`, `report` and `chat`: each, when given, overrides one generation setting."""
    g = p.add_argument_group("generation (override the settings in use)")
    g.add_argument("--max-new-tokens", type=int, help=f"default: {max_new_tokens_default}")
    g.add_argument("--min-new-tokens", type=int, help="hold EOS back until this many tokens")
    g.add_argument("--temperature", type=float, help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--num-beams", type=int, help="> 1: beam search")
    g.add_argument("--repetition-penalty", type=float, help="transformers' (1 = off)")
    g.add_argument("--presence-penalty", type=float, help="OpenAI semantics, -2..2")
    g.add_argument("--frequency-penalty", type=float, help="OpenAI semantics, -2..2")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")


GENERATION_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "num_beams",
                   "repetition_penalty", "presence_penalty", "frequency_penalty", "stop")


def generation_overrides(args) -> dict:
    """The generation flags given on the command line (applied over the settings in use, and validated, later)."""
    return {k: getattr(args, k) for k in GENERATION_KEYS if getattr(args, k) is not None}


def metric_list(text: str | None) -> list[str] | None:
    """`--metrics a,b` as a list; None (the recipe's own) when not given."""
    return [m.strip() for m in text.split(",") if m.strip()] if text else None
