"""What the recipe tests share: a recipe file written from text, a minimal recipe, its problems."""

from __future__ import annotations

import textwrap

import pytest

from align.config.loading import validate_recipe
from align.errors import ConfigError

MINIMAL = """\
name: quickstart
base: tiny/base
stages:
  sft:
    data: some.jsonl
"""


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def minimal(**stage) -> dict:
    return {"name": "quickstart", "base": "tiny/base", "stages": {"sft": {"data": "some.jsonl", **stage}}}


def problems_of(raw, overrides=()) -> list:
    with pytest.raises(ConfigError) as info:
        validate_recipe(raw, list(overrides))
    return info.value.problems
