"""The recipe schema: typed stages by kind, and the checks within one block (a PPO reward's one source)."""

from __future__ import annotations

import pytest

from align.config.loading import load_recipe, validate_recipe
from align.config.stages import PPOStage, SFTStage
from tests.config.recipe_helpers import MINIMAL, problems_of, write


def test_minimal_recipe_loads(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path)
    assert recipe.name == "quickstart"
    assert recipe.base == "tiny/base"
    assert list(recipe.stages) == ["sft"]
    stage = recipe.stage("sft")
    assert isinstance(stage, SFTStage)
    assert stage.kind == "sft"
    assert stage.data.path == "some.jsonl"
    assert stage.data.format == "auto"
    assert recipe.source == str(path)


def test_kind_makes_named_stage_an_sft_stage():
    raw = {"name": "q", "base": "m",
           "stages": {"sft": {"data": "a.jsonl"}, "sft_math": {"kind": "sft", "data": "math.jsonl", "lr": 1e-5}}}
    recipe = validate_recipe(raw, [])
    assert list(recipe.stages) == ["sft", "sft_math"]
    stage = recipe.stage("sft_math")
    assert isinstance(stage, SFTStage)
    assert stage.kind == "sft"
    assert stage.data.path == "math.jsonl"
    assert stage.lr == pytest.approx(1e-5)


def test_ppo_reward_with_model_and_checker_is_an_error():
    raw = {"name": "q", "base": "m",
           "stages": {"ppo": {"prompts": "p.jsonl", "rewards": [{"model": "rm", "checker": "gsm8k"}]}}}
    problems = problems_of(raw)
    assert [p.where for p in problems] == ["stages.ppo.rewards[0]"]
    assert "exactly one" in problems[0].message


def test_ppo_reward_with_one_source_is_valid():
    raw = {"name": "q", "base": "m",
           "stages": {"ppo": {"prompts": "p.jsonl", "rewards": [{"checker": "gsm8k", "weight": 2}]}}}
    stage = validate_recipe(raw, []).stage("ppo")
    assert isinstance(stage, PPOStage)
    assert stage.rewards[0].checker == "gsm8k"
    assert stage.rewards[0].weight == 2
