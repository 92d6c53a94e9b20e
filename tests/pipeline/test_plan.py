"""`align plan`: every problem of a recipe in one ConfigError with its path, no weights loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import align.models.packaged
from align.errors import ConfigError
from align.pipeline.plan import make_plan
from align.config.loading import load_recipe, validate_recipe
from align.registry.store import Registry
from tests.conftest import write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]
# Every recipe file under recipes/, found by globbing, so a new one is covered without editing this test;
# accelerate launch configs (recipes/accelerate/) are not recipes.
RECIPES = sorted(p for p in (REPO_ROOT / "recipes").glob("**/*.yaml")
                 if p.relative_to(REPO_ROOT / "recipes").parts[0] != "accelerate")


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load a model or the packaged GGUF fails the test. Tokenizers may load (no weights): the
    plan compares chat templates and measures the longest row for the memory estimate with them."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"plan loaded weights: {args[:1]}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    monkeypatch.setattr(align.models.packaged, "fetch_gguf", refuse)
    monkeypatch.setattr(align.models.packaged, "load_from_gguf", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def validate(raw: dict, tmp_path: Path):
    return validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))


def plan_problems(raw: dict, tmp_path: Path, only=None) -> dict[str, str]:
    recipe = validate(raw, tmp_path)
    with pytest.raises(ConfigError) as info:
        make_plan(recipe, Registry(tmp_path / "registry"), only)
    return {p.where: p.message for p in info.value.problems}


def test_valid_recipe_plans_without_loading_weights(tiny_raw_recipe, tiny_base, tmp_path, no_weights):
    recipe = validate(tiny_raw_recipe(tmp_path), tmp_path)
    plan = make_plan(recipe, Registry(tmp_path / "registry"))
    assert [(s.name, s.kind, s.output) for s in plan.stages] == [("sft", "sft", "tiny/sft")]
    assert plan.base.kind == "local" and plan.base.path == str(tiny_base)
    text = plan.describe()
    assert f"1. sft [sft] from base {tiny_base} -> tiny/sft@next" in text
    assert "(16 rows), format prompt_completion" in text
    assert not (tmp_path / "registry").exists() or not any((tmp_path / "registry").iterdir())


def test_all_problems_reported_at_once_with_their_paths(tiny_raw_recipe, tmp_path, no_weights):
    raw = tiny_raw_recipe(tmp_path)
    good = raw["stages"].pop("sft")
    raw["base"] = "no-such-model"
    raw["stages"] = {
        "first": {**good, "kind": "sft", "from": "second", "data": str(tmp_path / "missing.jsonl")},
        "second": {**good, "kind": "sft"},
    }
    raw["eval"]["checkers"] = ["math_answer", "no_such_checker"]
    problems = plan_problems(raw, tmp_path)
    assert set(problems) == {"base", "stages.first.data", "eval.checkers[1]", "stages.first.from"}, problems
    assert "no-such-model" in problems["base"]
    assert "missing.jsonl: file not found" in problems["stages.first.data"]
    assert "no_such_checker" in problems["eval.checkers[1]"] and "math_answer" in problems["eval.checkers[1]"]
    assert "'second' runs after 'first'" in problems["stages.first.from"]


def test_bad_row_reported_at_plan_time_with_its_index(tiny_raw_recipe, tmp_path, no_weights):
    raw = tiny_raw_recipe(tmp_path)
    data = Path(raw["stages"]["sft"]["data"])
    lines = data.read_text().splitlines()
    lines[2] = '{"prompt": "What is 5 + 6?"}'
    data.write_text("\n".join(lines) + "\n")
    problems = plan_problems(raw, tmp_path)
    assert problems == {f"stages.sft.data: {data}: row 2": "missing field `completion`"}

    # With `on_bad_rows: drop` the same file plans, and the plan says what will be dropped.
    raw["stages"]["sft"]["on_bad_rows"] = "drop"
    plan = make_plan(validate(raw, tmp_path), Registry(tmp_path / "registry"))
    assert "1 bad rows to drop" in plan.describe()


def test_ppo_bad_inputs_are_named_at_plan_time(tiny_raw_recipe, tmp_path, no_weights):
    """Prompts without the answers a checker needs, an unknown checker, bad checker arguments, and a reward
    ref that is not a reward model: all reported together, by place, before any weights load."""
    raw = tiny_raw_recipe(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"},
                                                       {"prompt": "What is 2 + 2?"}])
    raw["stages"]["ppo"] = {"from": "sft", "prompts": str(prompts), "rewards": [
        {"checker": "math_answer"}, {"checker": "no_such_checker"}, {"checker": "regex", "args": {"patern": "x"}},
        {"model": "sft"}]}
    problems = plan_problems(raw, tmp_path)
    assert problems["stages.ppo.prompts"] == (f"{prompts}: row 1: checker 'math_answer' needs field(s) answer")
    assert "unknown checker 'no_such_checker'" in problems["stages.ppo.rewards[1].checker"]
    assert "patern" in problems["stages.ppo.rewards[2].args"]
    assert "is a sft stage, not a reward model" in problems["stages.ppo.rewards[3].model"]


def test_ppo_stage_plans_with_its_reward_sources(tiny_raw_recipe, tmp_path, no_weights):
    raw = tiny_raw_recipe(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    raw["stages"]["reward"] = {"data": str(prefs)}
    raw["stages"]["ppo"] = {"prompts": str(prompts),
                            "rewards": [{"model": "reward", "weight": 0.5}, {"checker": "math_answer"}]}
    text = make_plan(validate(raw, tmp_path), Registry(tmp_path / "registry")).describe()
    assert "3. ppo [ppo] from output of stage sft -> tiny/ppo@next" in text
    assert "reward: output of stage reward" in text and "prompts checked for math_answer" in text


def test_reward_stage_plans_with_a_summary_of_its_pairs(tiny_raw_recipe, tmp_path, no_weights):
    raw = tiny_raw_recipe(tmp_path)
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(5)]
    rows += [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "x"}]
    # 2 of 7 rows dropped: allowed here, or the plan refuses it as the run would (see the next tests).
    raw["stages"]["reward"] = {"data": str(write_jsonl(tmp_path / "prefs.jsonl", rows)), "max_dropped_share": 0.5}
    plan = make_plan(validate(raw, tmp_path), Registry(tmp_path / "registry"))
    assert "prefs.jsonl (7 rows), explicit preference pairs (1 bad, 1 identical)" in plan.describe()
    # Under `on_bad_rows: error` the bad row is a plan problem naming the row.
    raw["stages"]["reward"]["on_bad_rows"] = "error"
    problems = plan_problems(raw, tmp_path)
    assert problems == {f"stages.reward.data: {tmp_path / 'prefs.jsonl'}: row 6": "missing field `rejected`"}


@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_plan_refuses_pairs_the_run_would_drop_too_many_of(kind, tiny_raw_recipe, tmp_path, no_weights):
    """40 of 40 pairs lack the `margin_field`: the run stops on max_dropped_share, so the plan does, with the
    run's own message (it printed "(40 bad)" and "plan OK"). Identical pairs count too, as the run drops them."""
    raw = tiny_raw_recipe(tmp_path)
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(40)]
    raw["stages"][kind] = {"data": str(write_jsonl(prefs, rows)), "margin_field": "strength", "on_bad_rows": "drop"}
    assert plan_problems(raw, tmp_path) == {f"stages.{kind}.data": (
        f"{prefs}: dropped 40 of 40 rows (40 missing field), more than the allowed share 10% (max_dropped_share)")}

    raw["stages"][kind]["margin_field"] = None
    write_jsonl(prefs, rows[:32] + [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 8)
    assert "dropped 8 of 40 rows (8 identical chosen and rejected)" in plan_problems(raw, tmp_path)[
        f"stages.{kind}.data"]
    raw["stages"][kind]["max_dropped_share"] = 0.2  # 8 of 40 is within it: the plan is OK
    make_plan(validate(raw, tmp_path), Registry(tmp_path / "registry"))


def test_plan_refuses_demonstrations_the_run_would_drop_too_many_of(tiny_raw_recipe, tmp_path, no_weights):
    """SFT under `on_bad_rows: drop`: 3 of 16 rows bad is over the default 10%, as in the run; 20% allows it."""
    raw = tiny_raw_recipe(tmp_path, {"on_bad_rows": "drop"})
    data = Path(raw["stages"]["sft"]["data"])
    lines = data.read_text().splitlines()
    lines[1:4] = ['{"prompt": "What is 5 + 6?"}'] * 3
    data.write_text("\n".join(lines) + "\n")
    assert plan_problems(raw, tmp_path) == {"stages.sft.data": (
        f"{data}: dropped 3 of 16 rows (3 missing field), more than the allowed share 10% (max_dropped_share)")}
    raw["stages"]["sft"]["max_dropped_share"] = 0.2
    assert "3 bad rows to drop" in make_plan(validate(raw, tmp_path), Registry(tmp_path / "registry")).describe()


def test_dpo_stage_plans_and_a_missing_chat_template_file_is_named(tiny_raw_recipe, tmp_path, no_weights):
    raw = tiny_raw_recipe(tmp_path)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}])
    raw["stages"]["dpo"] = {"data": str(prefs), "loss": "ipo", "beta": 0.2}
    plan = make_plan(validate(raw, tmp_path), Registry(tmp_path / "registry"))
    assert "dpo [dpo] from output of stage sft" in plan.describe() and "explicit preference pairs" in plan.describe()
    raw["stages"]["dpo"]["chat_template"] = "templates/missing.jinja"
    problems = plan_problems(raw, tmp_path)
    assert list(problems) == ["stages.dpo.chat_template"], problems
    assert "templates/missing.jinja" in problems["stages.dpo.chat_template"]


OTHER_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("kind", ["reward", "dpo", "ppo"])
@pytest.mark.parametrize("parent", ["base", "sft"])
def test_a_stage_whose_template_differs_from_its_parents_is_refused_at_plan_time(kind, parent, tiny_raw_recipe,
                                                                                 tmp_path, no_weights):
    """From the base (a local folder: its tokenizer is read) or from an earlier SFT stage of the recipe, a
    stage after SFT that sets another chat template is named with the other problems, before anything runs."""
    raw = tiny_raw_recipe(tmp_path)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])
    body = {"reward": {"data": str(prefs)}, "dpo": {"data": str(prefs)},
            "ppo": {"prompts": str(prompts), "rewards": [{"checker": "math_answer"}]}}[kind]
    raw["stages"][kind] = {**body, "from": parent, "chat_template": OTHER_TEMPLATE}
    data = raw["stages"]["sft"]["data"]
    raw["stages"]["sft"]["data"] = str(tmp_path / "missing.jsonl")  # another problem, named in the same pass
    problems = plan_problems(raw, tmp_path)
    assert set(problems) == {f"stages.{kind}.chat_template", "stages.sft.data"}, problems
    assert "differs from its parent" in problems[f"stages.{kind}.chat_template"]
    assert "allow_template_mismatch" in problems[f"stages.{kind}.chat_template"]
    raw["stages"]["sft"]["data"] = data
    raw["stages"][kind]["allow_template_mismatch"] = True
    make_plan(validate(raw, tmp_path), Registry(tmp_path / "registry"))
    del raw["stages"][kind]["chat_template"]  # the parent's template: nothing to refuse
    raw["stages"][kind]["allow_template_mismatch"] = False
    make_plan(validate(raw, tmp_path), Registry(tmp_path / "registry"))


def test_a_template_set_by_sft_is_the_one_later_stages_must_use(tiny_raw_recipe, tmp_path, no_weights):
    raw = tiny_raw_recipe(tmp_path)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}])
    raw["stages"]["sft"]["chat_template"] = OTHER_TEMPLATE
    raw["stages"]["dpo"] = {"data": str(prefs), "from": "sft"}
    make_plan(validate(raw, tmp_path), Registry(tmp_path / "registry"))  # inherits the SFT stage's template
    from align.models.tiny import CHATML

    raw["stages"]["dpo"]["chat_template"] = CHATML  # the base's template, not its parent's
    assert list(plan_problems(raw, tmp_path)) == ["stages.dpo.chat_template"]


def test_stage_option_naming_a_missing_stage(tiny_raw_recipe, tmp_path, no_weights):
    problems = plan_problems(tiny_raw_recipe(tmp_path), tmp_path, only=["nope"])
    assert list(problems) == ["--stage nope"]
    assert "no such stage" in problems["--stage nope"] and "sft" in problems["--stage nope"]


def test_stage_option_needs_an_unselected_parent_in_the_registry(tiny_raw_recipe, tmp_path, no_weights):
    raw = tiny_raw_recipe(tmp_path)
    raw["stages"] = {"a": {**raw["stages"]["sft"], "kind": "sft"}, "b": {**raw["stages"]["sft"], "kind": "sft"}}
    problems = plan_problems(raw, tmp_path, only=["b"])
    assert list(problems) == ["stages.b.from"]
    assert "tiny/a" in problems["stages.b.from"] and "run it first" in problems["stages.b.from"]


def test_the_repository_has_recipes():
    assert RECIPES, f"no recipes under {REPO_ROOT / 'recipes'}"


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO_ROOT)) for p in RECIPES])
def test_shipped_recipe_plans(path, tmp_path, monkeypatch, no_weights):
    monkeypatch.chdir(REPO_ROOT)
    recipe = load_recipe(path)
    try:
        plan = make_plan(recipe, Registry(tmp_path / "registry"))
    except ConfigError as err:
        # Recipes over the shared acceptance data (outside the repository) plan fully where it exists; elsewhere
        # a missing external file must be their only problem (make_plan reports every problem at once).
        external = [p for p in err.problems if "../shared/" in p.message and p.message.endswith("file not found")]
        if external and len(external) == len(err.problems):
            pytest.skip(f"acceptance data not on this machine: {external[0].message}")
        raise
    assert [s.name for s in plan.stages] == list(recipe.stages)
    assert plan.base is not None
    if recipe.base in align.models.packaged.PACKAGED:
        assert plan.base.kind == "packaged"  # resolved by name; nothing downloaded or converted
    assert not (tmp_path / "registry").exists()


def test_eval_prompts_without_the_fields_of_the_eval_checkers_are_named(tiny_raw_recipe, tmp_path, no_weights):
    raw = tiny_raw_recipe(tmp_path)
    prompts = write_jsonl(tmp_path / "eval_prompts.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"},
                                                            {"prompt": "What is 2 + 2?"}, {"answer": "3"}])
    raw["eval"]["prompts"] = str(prompts)
    problems = [str(p) for p in _plan_error(raw, tmp_path).problems]
    assert problems == [f"eval.prompts: {prompts}: row 1: checker 'math_answer' needs field(s) answer",
                        f"eval.prompts: {prompts}: row 2: missing field `prompt` (or one of question, messages, "
                        "instruction)"]


def _plan_error(raw: dict, tmp_path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        make_plan(validate(raw, tmp_path), Registry(tmp_path / "registry"))
    return info.value


def test_a_flash_attention_kernel_this_machine_cannot_run_is_named(tiny_raw_recipe, tmp_path, no_weights,
                                                                     monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    raw = tiny_raw_recipe(tmp_path)
    raw["stages"]["sft"]["attention"] = "flash_attention_2"
    problems = plan_problems(raw, tmp_path)
    assert set(problems) == {"stages.sft.attention"}
    assert "flash_attention_2 needs a CUDA GPU" in problems["stages.sft.attention"]
    raw["stages"]["sft"]["attention"] = "eager"
    assert make_plan(validate(raw, tmp_path), Registry(tmp_path / "registry")).stages


# ------------------------------------------------------------------------------------------ issue 31.3, 32.8


def all_problems(raw: dict, tmp_path: Path, only=None) -> dict[str, str]:
    """Schema, cross-field and plan problems of a recipe in one report, as `align plan` gives them."""
    from align.pipeline.plan import add_plan_problems

    with pytest.raises(ConfigError) as info:
        validate(raw, tmp_path)
    report = add_plan_problems(info.value, Registry(tmp_path / "registry"), only)
    return {p.where: p.message for p in report.problems}


def test_schema_and_file_problems_come_in_one_report(tiny_raw_recipe, tmp_path, no_weights):
    """The README's three-error example: a wrong type, an unknown key and a missing data file, all at once
    (before, the missing file was named only once the schema was clean)."""
    raw = tiny_raw_recipe(tmp_path)
    raw["stages"]["sft"].update({"lr": "fast", "epoch": 1, "data": "data/missing.jsonl"})
    assert all_problems(raw, tmp_path) == {
        "stages.sft.lr": 'expected a number, got "fast"',
        "stages.sft.epoch": 'unknown key (did you mean "epochs"?)',
        "stages.sft.data": "data/missing.jsonl: file not found",
    }


def test_every_stage_is_checked_beside_a_stage_with_schema_errors(tiny_raw_recipe, tmp_path, no_weights):
    raw = tiny_raw_recipe(tmp_path)
    good = raw["stages"]["sft"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 + 1?"}])
    raw["stages"] = {
        "sft": {**good, "batch_size": "big"},
        "odd": {"kind": "rlhf"},
        "ppo": {"from": "sfft", "prompts": str(prompts), "rollout_batch": 4, "minibatch": 8,
                "rewards": [{"checker": "math_answer", "args": {"tolerance": "x"}}]},
        "dpo": {"from": "odd", "data": str(tmp_path / "missing_pairs.jsonl")},
    }
    raw["eval"]["metrics"] = ["loss", "nope"]
    problems = all_problems(raw, tmp_path)
    assert set(problems) == {"stages.sft.batch_size", "stages.odd.kind", "stages.ppo", "stages.ppo.from",
                             "stages.ppo.rewards[0].args", "stages.ppo.prompts", "stages.dpo.data",
                             "eval.metrics[1]"}, problems
    assert "missing_pairs.jsonl: file not found" in problems["stages.dpo.data"]
    assert "needs field(s) answer" in problems["stages.ppo.prompts"]


def test_a_broken_key_skips_only_the_checks_that_read_it(tiny_raw_recipe, tmp_path, no_weights):
    """`on_bad_rows: dorp` is reported once; the bad row is not judged by the default policy (error), but the
    missing eval file is still named."""
    raw = tiny_raw_recipe(tmp_path)
    data = Path(raw["stages"]["sft"]["data"])
    lines = data.read_text().splitlines()
    lines[2] = '{"prompt": "What is 5 + 6?"}'
    data.write_text("\n".join(lines) + "\n")
    raw["stages"]["sft"].update({"on_bad_rows": "dorp", "eval_data": str(tmp_path / "gone.jsonl")})
    problems = all_problems(raw, tmp_path)
    assert set(problems) == {"stages.sft.on_bad_rows", "stages.sft.eval_data"}, problems


def test_checker_argument_values_are_checked_at_plan_time(tiny_raw_recipe, tmp_path, no_weights):
    """A value a checker cannot use would score every completion 0.0 at run time; the plan names it."""
    raw = tiny_raw_recipe(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q", "answer": "2", "tests": ["assert True"]}])
    raw["stages"]["ppo"] = {"prompts": str(prompts), "rewards": [
        {"checker": "math_answer", "args": {"tolerance": "x"}},
        {"checker": "python_tests", "args": {"timeout": -1, "memory_mb": 0, "partial": True}},
        {"checker": "math_answer", "args": {"tolerance": 0.01}},
        {"checker": "regex", "args": {"pattern": "^#", "full": "maybe"}}]}
    recipe = validate(raw, tmp_path)
    with pytest.raises(ConfigError) as info:
        make_plan(recipe, Registry(tmp_path / "registry"))
    assert [str(p) for p in info.value.problems] == [
        "stages.ppo.rewards[0].args: checker 'math_answer': tolerance: expected a number, got 'x'",
        "stages.ppo.rewards[1].args: checker 'python_tests': timeout: must be greater than 0, got -1",
        "stages.ppo.rewards[1].args: checker 'python_tests': memory_mb: must be greater than 0, got 0",
        "stages.ppo.rewards[3].args: checker 'regex': full: expected true or false, got 'maybe'",
    ]


def test_a_from_typo_is_told_the_recipes_own_stage_names(tiny_raw_recipe, tmp_path, no_weights):
    raw = tiny_raw_recipe(tmp_path)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    raw["stages"]["dpo"] = {"from": "sfft", "data": str(prefs)}
    problems = plan_problems(raw, tmp_path)
    assert problems["stages.dpo.from"].endswith('(did you mean "sft", a stage of this recipe?)'), problems


def test_plan_names_a_mapped_column_missing_from_the_data(tiny_raw_recipe, tmp_path, no_weights):
    """`columns: {new: old}` is checked at plan time on the rows: a column the file lacks is named with the file,
    the key and the row, before any weights load."""
    raw = tiny_raw_recipe(tmp_path)
    raw["stages"]["sft"]["data"] = {"path": raw["stages"]["sft"]["data"], "columns": {"prompt": "question"}}
    recipe = validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))
    with pytest.raises(ConfigError) as info:
        make_plan(recipe, Registry(tmp_path / "registry"))
    assert "stages.sft.data" in str(info.value)
    assert "sft.jsonl: row 0: no column 'question' for columns.prompt" in str(info.value)
