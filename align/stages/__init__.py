"""The stage kinds, each a `Stage` subclass (`align.stages.base`) in its own module, registered by name.

The plan, the memory estimate, the CLI, the report and the pipeline ask `stage_class(kind)` what a kind
needs instead of testing kind strings. Adding a kind is one module with a `@register_stage` class, plus its
module's name on the import line in `_load_kinds`.
"""

from __future__ import annotations

STAGES: dict[str, type] = {}


def register_stage(cls):
    """Class decorator: make a `Stage` subclass the implementation of its `kind`."""
    if cls.kind in STAGES and STAGES[cls.kind] is not cls:
        raise ValueError(f"stage kind {cls.kind!r} is registered twice ({STAGES[cls.kind].__name__}, {cls.__name__})")
    STAGES[cls.kind] = cls
    return cls


def _load_kinds() -> dict[str, type]:
    """Import the kinds' modules once (they register themselves), on first use: they pull in torch."""
    from align.stages import dpo, kto, ppo, reward, sft  # noqa: F401 - the shipped kinds

    return STAGES


def stage_kinds() -> dict[str, type]:
    """Every registered kind, by name (sorted, so messages list them the same way however they loaded)."""
    kinds = _load_kinds()
    return {kind: kinds[kind] for kind in sorted(kinds)}


def stage_class(kind: str):
    """The `Stage` subclass for `kind`; KeyError naming the known kinds otherwise."""
    kinds = stage_kinds()
    if kind not in kinds:
        raise KeyError(f"stage kind {kind!r} is not implemented (known: {', '.join(sorted(kinds))})")
    return kinds[kind]
