"""Loading a recipe: files, `--set` overrides, `defaults` merged into stages, every problem in one
report, and the partial recipe a schema error carries."""

from __future__ import annotations

import pytest

from align.config.loading import load_recipe, validate_recipe
from align.errors import ConfigError
from tests.config.recipe_helpers import MINIMAL, minimal, problems_of, write


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        validate_recipe(minimal(lr="fast", batch_size="big", lrr=1), [])
    err = info.value
    assert len(err.problems) == 3
    assert sorted(p.where for p in err.problems) == ["stages.sft.batch_size", "stages.sft.lr", "stages.sft.lrr"]
    assert "3 problems found" in str(err)


def test_cross_field_problems_come_with_key_and_type_errors_in_one_report():
    """A stage's checks between fields are reported in the same pass as its unknown keys and wrong types,
    in nested blocks too, instead of only after those are fixed."""
    raw = {"name": "q", "base": "m", "stages": {
        "ppo": {"prompts": "p.jsonl", "rewards": [{"checker": "math_answer"}], "rollout_batch": 16,
                "samples_per_prompt": 3, "lrr": 1,
                "generation": {"max_new_tokens": 4, "min_new_tokens": 8, "temprature": 1}},
        "dpo": {"data": "d.jsonl", "loss": "cdpo", "beta": "high"}}}
    problems = {str(p) for p in problems_of(raw)}
    assert problems == {
        'stages.ppo.lrr: unknown key (did you mean "lr"?)',
        'stages.ppo.generation.temprature: unknown key (did you mean "temperature"?)',
        'stages.dpo.beta: expected a number, got "high"',
        "stages.ppo: rollout_batch (16) must be a multiple of samples_per_prompt (3)",
        "stages.ppo.generation: min_new_tokens (8) is larger than max_new_tokens (4)",
        "stages.dpo: loss cdpo needs label_smoothing > 0 (the assumed share of flipped labels)",
    }


def test_a_stage_with_only_key_errors_gets_no_invented_cross_field_problem():
    problems = problems_of(minimal(lrr=1, epochs="many"))
    assert sorted(p.where for p in problems) == ["stages.sft.epochs", "stages.sft.lrr"]


def test_error_from_file_names_the_file(tmp_path):
    path = write(tmp_path, MINIMAL + "    lr: fast\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    assert [p.where for p in info.value.problems] == ["stages.sft.lr"]


def test_set_override_parses_number(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["stages.sft.lr=1e-4"])
    lr = recipe.stage("sft").lr
    assert isinstance(lr, float)
    assert lr == pytest.approx(1e-4)


def test_set_override_parses_yaml_values():
    recipe = validate_recipe(minimal(), ["stages.sft.packing=true", "stages.sft.lora.targets=[q_proj, v_proj]"])
    assert recipe.stage("sft").packing is True
    assert recipe.stage("sft").lora.targets == ["q_proj", "v_proj"]


def test_set_override_does_not_modify_input():
    raw = minimal()
    validate_recipe(raw, ["stages.sft.lr=0.5"])
    assert "lr" not in raw["stages"]["sft"]


def test_set_override_through_non_mapping_is_a_problem():
    problems = problems_of(minimal(), ["stages.sft.data.path.x=1"])
    assert len(problems) == 1
    assert problems[0].where == "--set stages.sft.data.path.x"
    assert "`stages.sft.data` is not a mapping" in problems[0].message


def test_set_override_without_value_is_a_problem():
    problems = problems_of(minimal(), ["stages.sft.lr"])
    assert [p.where for p in problems] == ["--set stages.sft.lr"]


def test_set_override_bad_value_is_validated():
    problems = problems_of(minimal(), ["stages.sft.lr=fast"])
    assert [str(p) for p in problems] == ['stages.sft.lr: expected a number, got "fast"']


def test_unknown_stage_kind_is_named():
    raw = {"name": "q", "base": "m", "stages": {"sfx": {"data": "x.jsonl"}}}
    problems = problems_of(raw)
    named = [p for p in problems if p.where == "stages.sfx"]
    assert len(named) == 1
    assert "'sfx'" in named[0].message
    assert "sft" in named[0].message and "kind:" in named[0].message


def test_unknown_stage_kind_is_the_only_problem():
    raw = {"name": "q", "base": "m", "stages": {"sfx": {"data": "x.jsonl"}}}
    assert [p.where for p in problems_of(raw)] == ["stages.sfx"]


def test_unknown_explicit_kind_points_at_kind_key():
    raw = {"name": "q", "base": "m",
           "stages": {"sft": {"data": "x.jsonl"}, "extra": {"kind": "sfx", "data": "x.jsonl"}}}
    problems = problems_of(raw)
    assert [p.where for p in problems] == ["stages.extra.kind"]


def test_defaults_are_deep_merged_into_stages():
    raw = minimal(lora={"alpha": 64})
    raw["defaults"] = {"lora": {"r": 8}, "seed": 7}
    recipe = validate_recipe(raw, [])
    stage = recipe.stage("sft")
    assert stage.lora.r == 8
    assert stage.lora.alpha == 64
    assert stage.seed == 7


def test_stage_value_wins_over_default():
    raw = minimal(lora={"r": 4}, seed=1)
    raw["defaults"] = {"lora": {"r": 8}, "seed": 7}
    stage = validate_recipe(raw, []).stage("sft")
    assert stage.lora.r == 4
    assert stage.seed == 1


@pytest.mark.parametrize("text, expected", [
    ("- a\n- b\n", "got a list"),
    ("", "got an empty file"),
    ("name: q\nbase: [unclosed\nstages:\n", "not valid YAML"),
    ("name: q\nbase: m\nstages:\n  sft:\n    data: x.jsonl\n\tlr: 1\n", "not valid YAML"),
], ids=["list", "empty", "syntax", "tab"])
def test_bad_yaml_file_is_one_config_error_naming_the_file(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    err = info.value
    assert len(err.problems) == 1
    assert expected in err.problems[0].message
    assert str(path) in str(err)


def test_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: q\nbase: [unclosed\nstages:\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.problems[0].where.startswith(f"{path}:3:")


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert [p.where for p in info.value.problems] == [str(path)]
    assert "not found" in info.value.problems[0].message


def test_every_conflict_of_a_stage_comes_in_one_report():
    """A stage's checks between fields are all reported, not only the first (one recipe needed a round for
    minibatch, then one for num_beams)."""
    raw = {"name": "q", "base": "m", "stages": {
        "ppo": {"prompts": "p.jsonl", "rewards": [{"checker": "math_answer"}], "rollout_batch": 6,
                "samples_per_prompt": 4, "minibatch": 8, "generation": {"num_beams": 2}},
        "dpo": {"data": "d.jsonl", "loss": "cdpo", "reference": "copy"}}}
    problems = [str(p) for p in problems_of(raw)]
    assert sorted(problems) == sorted([
        "stages.ppo: rollout_batch (6) must be a multiple of samples_per_prompt (4)",
        "stages.ppo: minibatch (8) is larger than rollout_batch (6)",
        "stages.ppo: generation.num_beams is 2, but PPO needs responses sampled from the policy (beam search "
        "picks high-likelihood sequences, not samples): use num_beams: 1 with temperature > 0",
        "stages.dpo: loss cdpo needs label_smoothing > 0 (the assumed share of flipped labels)",
    ])


def test_every_conflict_also_comes_beside_key_errors():
    raw = {"name": "q", "base": "m", "stages": {
        "ppo": {"prompts": "p.jsonl", "rewards": [{"checker": "math_answer"}], "rollout_batch": 4,
                "minibatch": 8, "generation": {"num_beams": 2}, "lrr": 1}}}
    problems = sorted(str(p) for p in problems_of(raw))
    assert len(problems) == 3
    assert problems[0].startswith("stages.ppo.lrr: unknown key")
    assert problems[1].startswith("stages.ppo: generation.num_beams is 2")
    assert problems[2] == "stages.ppo: minibatch (8) is larger than rollout_batch (4)"


def test_a_typo_inside_defaults_is_reported_once_where_it_was_written():
    raw = {"name": "q", "base": "m", "defaults": {"lora": {"rr": 3}, "max_length": "long"},
           "stages": {"sft": {"data": "a.jsonl"}, "dpo": {"data": "d.jsonl"}}}
    assert [str(p) for p in problems_of(raw)] == [
        'defaults.lora.rr: unknown key (did you mean "r"?)',
        'defaults.max_length: expected an integer, got "long"',
    ]


def test_a_stage_that_sets_the_key_itself_is_not_blamed_on_defaults():
    raw = {"name": "q", "base": "m", "defaults": {"lora": {"r": 8}},
           "stages": {"sft": {"data": "a.jsonl", "lora": {"alpah": 3}}}}
    assert [p.where for p in problems_of(raw)] == ["stages.sft.lora.alpah"]


def test_a_key_defaults_does_not_accept_is_merged_nowhere():
    raw = {"name": "q", "base": "m", "defaults": {"lr": "fast"}, "stages": {"sft": {"data": "a.jsonl"}}}
    assert [p.where for p in problems_of(raw)] == ["defaults.lr"]


def test_a_schema_error_carries_the_recipe_as_far_as_it_validates():
    from align.config.recipe import broken_keys

    raw = {"name": "q", "base": "m", "stages": {
        "sft": {"data": "a.jsonl", "lr": "fast", "on_bad_rows": "drop"},
        "odd": {"kind": "rlhf"}, "dpo": {"data": "d.jsonl"}}, "eval": {"limit": "x", "checkers": ["math_answer"]}}
    with pytest.raises(ConfigError) as info:
        validate_recipe(raw, [])
    partial = info.value.partial
    assert partial.base == "m" and list(partial.stages) == ["sft", "dpo"]
    assert broken_keys(partial, "stages.sft") == {"lr"} and broken_keys(partial, "stages.dpo") == set()
    assert partial.stages["sft"].on_bad_rows == "drop" and partial.stages["sft"].data.path == "a.jsonl"
    assert broken_keys(partial, "stages") == {"odd"}
    assert broken_keys(partial, "eval") == {"limit"} and partial.eval.checkers == ["math_answer"]


def test_a_duplicate_key_is_refused_with_its_line_and_path(tmp_path):
    path = write(tmp_path, MINIMAL + "    lr: 1.0e-4\n    lr: 2.0e-4\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:7: duplicate key `stages.sft.lr` (first at line 6); YAML would silently keep only the last"]


def test_a_non_utf8_byte_in_a_recipe_is_named_by_line_and_column(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(MINIMAL.encode() + b"    # caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert [p.where for p in info.value.problems] == [f"{path}:6:10"]
    assert "not UTF-8 text (byte 0xe9)" in info.value.problems[0].message
