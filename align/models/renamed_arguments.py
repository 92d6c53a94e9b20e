"""transformers' current names for the arguments it renamed, with the old name where the installed version
has only that one.

Why: transformers 5.23 renamed gradient checkpointing to activation checkpointing (`TrainingArguments`'
`activation_checkpointing` and `activation_checkpointing_kwargs`) and 5.24 renamed the forward passes'
`past_key_values` to `cache`. The old names still work there, with a FutureWarning at every stage and every
KV-cached pass; pyproject allows transformers from 5.20, which knows only the old names. So each name is
read off what is installed: the `TrainingArguments` fields, and the model's own forward signature (a model
with its own modeling code, `trust_remote_code`, may keep the old name on a new transformers).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect


@functools.cache
def _activation_checkpointing_known() -> bool:
    from transformers import TrainingArguments

    return "activation_checkpointing_kwargs" in {field.name for field in dataclasses.fields(TrainingArguments)}


def checkpointing_arguments(enabled: bool) -> dict:
    """`TrainingArguments` keywords that turn checkpointing on or off (non-reentrant, the only kind that
    works with frozen embeddings), under the installed transformers' names."""
    prefix = "activation" if _activation_checkpointing_known() else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


@functools.cache
def _forward_takes_cache(model_class: type) -> bool:
    try:
        return "cache" in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):  # no readable signature: the old name, which every version accepts
        return False


def cache_argument(model) -> str:
    """The keyword under which `model`'s forward takes a KV cache: `cache` (transformers >= 5.24) or
    `past_key_values`. A PEFT wrapper passes keywords on to the model it wraps, whose signature decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if _forward_takes_cache(type(base)) else "past_key_values"
