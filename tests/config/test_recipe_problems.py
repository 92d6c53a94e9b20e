"""The wording of schema problems: the key path, "did you mean", what was expected and what was given."""

from __future__ import annotations

from align.config.problems import clean_loc, format_loc
from tests.config.recipe_helpers import minimal, problems_of


def test_misspelled_key_is_named_with_suggestion():
    problems = problems_of(minimal(lrr=1e-4))
    assert len(problems) == 1
    assert problems[0].where == "stages.sft.lrr"
    assert '"lr"' in problems[0].message
    assert "did you mean" in problems[0].message


def test_misspelled_nested_key_in_kind_stage_is_named():
    raw = {"name": "q", "base": "m",
           "stages": {"sft_math": {"kind": "sft", "data": "x.jsonl", "lora": {"alpah": 3}}}}
    problems = problems_of(raw)
    assert [p.where for p in problems] == ["stages.sft_math.lora.alpah"]
    assert '"alpha"' in problems[0].message


def test_wrong_type_message():
    problems = problems_of(minimal(lr="fast"))
    assert len(problems) == 1
    assert str(problems[0]) == 'stages.sft.lr: expected a number, got "fast"'


def test_a_key_path_is_dotted_with_list_indexes_in_brackets():
    assert format_loc(("stages", "ppo", "rewards", 0, "weight")) == "stages.ppo.rewards[0].weight"


def test_the_tags_pydantic_adds_to_a_path_are_dropped():
    """The stage-kind tag of the discriminated union and a union member's tag are not keys the user wrote."""
    assert clean_loc(("stages", "sft", "sft", "lr")) == ("stages", "sft", "lr")
    assert clean_loc(("stages", "sft", "sft", "lora", "targets", "list[str]")) == ("stages", "sft", "lora", "targets")
