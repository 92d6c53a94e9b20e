"""Preference data both pair stages share: the stage's own checks and tokenization (`prepare_pairs`)."""

from __future__ import annotations


def prepared_pairs(ctx):
    """(tokenizer, train pairs, held-out pairs) exactly as the reward/DPO stage prepares them."""
    from align.data.prepare import prepare_pairs
    from align.models.loading import materialize
    from align.stages.building import stage_tokenizer

    ctx.parent = materialize(ctx.parent, ctx.registry)
    tokenizer = stage_tokenizer(ctx)
    train, heldout, _ = prepare_pairs(ctx.recipe, ctx.config, tokenizer)
    return tokenizer, train, heldout


def pair_tokens(pairs) -> int:
    return sum(p.tokens for p in pairs)
