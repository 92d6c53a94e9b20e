"""User code as checkers and reward functions (`align.rewards.plugins`): loaded from a module path or from a
file beside the recipe, imported once, recorded with its file's hash; it scores a tiny PPO stage exactly as
the equivalent built-in does; every plan-time problem is named by its YAML path, all at once; and an error
or a non-number while scoring names the function and the row."""

from __future__ import annotations

import re
import uuid

import pytest

from align.config.loading import validate_recipe
from align.config.recipe import EvalSettings
from align.config.schema import RewardSource
from align.errors import ConfigError
from align.pipeline.plan import make_plan
from align.pipeline.run import run_recipe
from align.registry.fingerprint import hash_file
from align.registry.store import Registry
from align.rewards.checkers import find_checker
from align.rewards.mix import RewardMix, function_term, load_reward_function
from align.rewards.plugins import PluginError, load_callable
from tests.conftest import EVAL_ROWS, write_jsonl
from tests.stages.test_ppo import DIGIT, _recipe

FILE_CHECKS = '''
THRESHOLD = 3

def contains(completion, row, text):
    return 1.0 if text in completion else 0.0

def contains_any(completion, row, characters: str):
    return 1.0 if any(c in completion for c in characters) else 0.0

def nonempty(completion, row):
    return float(bool(completion.strip()))

def scaled(completion, row, scale: float = 1.0):
    return scale

def one_argument(completion):
    return 1.0

def fails_on_row(completion, row):
    raise ValueError("cannot read this row")

def not_a_number(completion, row):
    return "yes"

def nan(completion, row):
    return float("nan")
'''

MODULE_CODE = '''
import statistics

def has_digit(completion, row):
    return 1.0 if any(c.isdigit() for c in completion) else 0.0

def constant(prompts, completions, rows, value=0.5):
    return [value] * len(completions)

def wrong_length(prompts, completions, rows):
    return [1.0]

def needs_answers(prompts, completions, rows):
    return [float(row["answer"]) for row in rows]

def mean_chars(ctx):
    return {"mean_chars": statistics.fmean(len(g.text) for g in ctx.generations)}
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """An importable package of user code (a name of its own per test, so no import is shared between tests)."""
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    package = tmp_path / "site" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(MODULE_CODE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return f"{name}.scoring"


@pytest.fixture
def recipe_folder(tmp_path):
    folder = tmp_path / "recipe"
    folder.mkdir()
    (folder / "my_checks.py").write_text(FILE_CHECKS)
    return folder


# ------------------------------------------------------------------------------------------ loading


def test_a_file_plugin_is_found_beside_the_recipe_imported_once_and_hashed(recipe_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the recipe's folder: the path is resolved the way data paths are
    recipe = validate_recipe({"name": "r", "base": "x", "stages": {"sft": {"data": "d.jsonl"}}}, [],
                             source=str(recipe_folder / "r.yaml"))
    first = load_callable("./my_checks.py:contains", recipe.resolve_path)
    again = load_callable("./my_checks.py:nonempty", recipe.resolve_path)
    assert first.fn("say 1", {}, text="1") == 1.0 and first.label == "contains"
    assert first.fn.__globals__ is again.fn.__globals__  # one import of the file for both functions
    assert first.record() == {"spec": "./my_checks.py:contains", "file": str((recipe_folder / "my_checks.py").resolve()),
                              "hash": hash_file(recipe_folder / "my_checks.py")}
    (recipe_folder / "my_checks.py").write_text(FILE_CHECKS + "\ndef extra(completion, row):\n    return 0.0\n")
    edited = load_callable("./my_checks.py:contains", recipe.resolve_path)
    assert edited.fn.__globals__ is not first.fn.__globals__ and edited.file_hash != first.file_hash


def test_a_module_plugin_imports_normally(user_module):
    plugin = load_callable(f"{user_module}:has_digit")
    assert plugin.fn("a 7", {}) == 1.0 and plugin.fn("none", {}) == 0.0
    assert plugin.file.endswith("scoring.py") and plugin.file_hash == hash_file(plugin.file)


@pytest.mark.parametrize("spec, message", [
    ("no_such_package_xyz.checks:fn", "module 'no_such_package_xyz.checks' not found"),
    ("./my_checks.py:missing", "no function 'missing' in file ./my_checks.py"),
    ("./my_checks.py:THRESHOLD", "'THRESHOLD' in file ./my_checks.py is not callable (it is an int)"),
    ("./nowhere.py:fn", "file ./nowhere.py not found"),
    ("./my_checks.py:", "expected `package.module:function` or `path/to/file.py:function`"),
])
def test_load_errors_say_what_is_wrong(spec, message, recipe_folder, monkeypatch):
    monkeypatch.chdir(recipe_folder)
    with pytest.raises(PluginError, match="^" + re.escape(f"checker {spec!r}: ")) as info:
        find_checker(spec)
    assert message in str(info.value)


def test_a_file_that_fails_to_import_is_named_with_its_error_and_line(tmp_path):
    (tmp_path / "broken.py").write_text("x = 1\ny = 1 / 0\n")
    with pytest.raises(PluginError, match=r"importing .*broken\.py failed: ZeroDivisionError: division by zero "
                                          r"\(at broken\.py:2\)"):
        load_callable(f"{tmp_path / 'broken.py'}:fn")


# ------------------------------------------------------------------------------------------ scoring


def test_a_user_checker_that_raises_or_returns_no_number_names_the_function_and_the_row(recipe_folder, monkeypatch):
    monkeypatch.chdir(recipe_folder)
    rows = [{"row": 4}, {"row": 9}]
    with pytest.raises(PluginError, match=r"checker './my_checks.py:fails_on_row' raised ValueError: cannot read "
                                          r"this row \(at my_checks.py:\d+\) on prompt row 4"):
        find_checker("./my_checks.py:fails_on_row").scores(["a", "b"], rows, {})
    with pytest.raises(PluginError, match=r"'./my_checks.py:not_a_number' returned 'yes' for prompt row 4; it must "
                                          "return a number"):
        find_checker("./my_checks.py:not_a_number").scores(["a"], rows, {})
    with pytest.raises(PluginError, match=r"'./my_checks.py:nan' returned nan for prompt row 4"):
        find_checker("./my_checks.py:nan").scores(["a"], rows, {})


def test_a_reward_function_gets_the_batch_and_its_scores_are_checked(user_module):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}], "row": i} for i in range(3)]
    term = function_term("constant", 2.0, load_reward_function(f"{user_module}:constant"), {"value": 0.25})
    total, per_source = RewardMix([term])(rows, ["a", "b", "c"])
    assert per_source["constant"].tolist() == [0.25] * 3 and total.tolist() == [0.5] * 3
    short = function_term("wrong_length", 1.0, load_reward_function(f"{user_module}:wrong_length"), {})
    with pytest.raises(PluginError, match=r"'.*:wrong_length' returned 1 value\(s\) for 3 completions"):
        short.score(rows, ["a", "b", "c"])
    failing = function_term("needs_answers", 1.0, load_reward_function(f"{user_module}:needs_answers"), {})
    with pytest.raises(PluginError, match=r"reward function '.*:needs_answers' raised KeyError: 'answer' "
                                          r"\(at scoring.py:\d+\) on the batch of prompt rows 0, 1, 2"):
        failing.score(rows, ["a", "b", "c"])


def test_a_stage_config_without_user_functions_dumps_as_before():
    """The stage fingerprint hashes this dump: a recipe that uses no `function` source keeps its hash."""
    assert RewardSource(checker="regex", args={"pattern": "a"}).model_dump(by_alias=True) == {
        "model": None, "checker": "regex", "weight": 1.0, "args": {"pattern": "a"}}
    assert RewardSource(function="pkg.mod:fn").model_dump()["function"] == "pkg.mod:fn"
    with pytest.raises(ValueError, match="exactly one of `model`.*`checker`.*`function`.*got checker and function"):
        RewardSource(checker="regex", function="pkg.mod:fn")


# ------------------------------------------------------------------------------------------ the plan


def test_every_plan_time_problem_of_user_code_is_named_at_its_path(tiny_raw_recipe, tmp_path, recipe_folder,
                                                                   user_module):
    raw = tiny_raw_recipe(recipe_folder)
    prompts = write_jsonl(recipe_folder / "prompts.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])
    raw["stages"]["ppo"] = {"from": "sft", "prompts": str(prompts), "rewards": [
        {"checker": "no_such_package_xyz.checks:fn"},
        {"checker": "./my_checks.py:missing"},
        {"checker": "./my_checks.py:THRESHOLD"},
        {"checker": "./my_checks.py:one_argument"},
        {"checker": "./my_checks.py:contains", "args": {"txt": "1"}},
        {"checker": "./my_checks.py:scaled", "args": {"scale": "big"}},
        {"function": "./my_checks.py:contains"},
        {"function": f"{user_module}:constant", "args": {"valu": 1.0}},
        {"checker": f"{user_module}:has_digit"}]}  # the one source without a problem
    raw["eval"]["metrics"] = ["loss", "./my_checks.py:nope", f"{user_module}:has_digit", f"{user_module}:mean_chars"]
    raw["eval"]["checkers"] = ["math_answer", "./my_checks.py:contains"]
    recipe = validate_recipe(raw, [], source=str(recipe_folder / "r.yaml"))
    with pytest.raises(ConfigError) as info:
        make_plan(recipe, Registry(tmp_path / "registry"))
    problems = {p.where: p.message for p in info.value.problems}
    at = "stages.ppo.rewards"
    assert "module 'no_such_package_xyz.checks' not found" in problems[f"{at}[0].checker"]
    assert "no function 'missing' in file ./my_checks.py" in problems[f"{at}[1].checker"]
    assert "'THRESHOLD' in file ./my_checks.py is not callable" in problems[f"{at}[2].checker"]
    assert ("a checker is called as fn(completion, row, **args), but one_argument(completion): too many positional "
            "arguments") in problems[f"{at}[3].checker"]
    assert problems[f"{at}[4].args"] == ("checker './my_checks.py:contains': unexpected argument(s) 'txt' (accepted: "
                                         "text); needs argument(s) 'text'")
    assert problems[f"{at}[5].args"] == "checker './my_checks.py:scaled': scale: expected a number, got 'big'"
    assert "got an unexpected keyword argument 'prompts'" in problems[f"{at}[6].function"]
    assert "unexpected argument(s) 'valu' (accepted: value)" in problems[f"{at}[7].args"]
    assert "no function 'nope' in file ./my_checks.py" in problems["eval.metrics[1]"]
    assert "a metric is called as fn(ctx)" in problems["eval.metrics[2]"]
    assert "needs argument(s) 'text'" in problems["eval.checkers[1]"]
    assert not [where for where in problems if where.startswith((f"{at}[8]", "eval.metrics[3]", "eval.checkers[0]"))]


# ------------------------------------------------------------------------------------------ a PPO stage


def _plugin_recipe(folder, base, user_module, stage: dict):
    """The tiny PPO recipe of tests/stages/test_ppo.py, evaluated by user checkers and a user metric."""
    recipe = _recipe(folder, base, {"max_steps": 2, **stage})
    prompts = write_jsonl(folder / "eval_prompts.jsonl", EVAL_ROWS)
    settings = EvalSettings(prompts=str(prompts), checkers=[f"{user_module}:has_digit", "./my_checks.py:nonempty"],
                            metrics=["checkers", "length", f"{user_module}:mean_chars"],
                            generation={"max_new_tokens": 8}, limit=3, samples=0, batch_size=4)
    return recipe.model_copy(update={"eval": settings})


def test_user_checkers_and_a_reward_function_score_a_ppo_stage_and_its_evaluation(tmp_path, tiny_base, monkeypatch,
                                                                                recipe_folder, user_module):
    rewards = [{"checker": f"{user_module}:has_digit"}, DIGIT,  # the same test of a digit, two ways
               {"checker": "./my_checks.py:contains_any", "args": {"characters": "13579"}},
               {"checker": "regex", "args": {"pattern": "[13579]"}},
               {"function": f"{user_module}:constant", "args": {"value": 0.25}, "weight": 2.0}]
    recipe = _plugin_recipe(recipe_folder, tiny_base, user_module, {"rewards": rewards})
    monkeypatch.chdir(tmp_path)  # the file checker is found beside the recipe
    entry = run_recipe(recipe, Registry(recipe_folder / "registry"), runs_root=recipe_folder / "runs")["ppo"]

    history = entry.manifest["history"]
    assert len(history) == 2
    for step in history:
        assert step["reward/has_digit"] == step["reward/regex"]
        assert step["reward/contains_any"] == step["reward/regex#2"]
        assert step["reward/constant"] == 0.25
        parts = step["reward/has_digit"] + step["reward/regex"] + step["reward/contains_any"] + step["reward/regex#2"]
        assert step["reward"] == pytest.approx(parts + 2 * 0.25, abs=1e-5)
    sources = entry.manifest["rl"]["rewards"]
    assert [s["name"] for s in sources] == ["has_digit", "regex", "contains_any", "regex#2", "constant"]
    module_file = load_callable(f"{user_module}:has_digit").file
    assert sources[0]["plugin"] == {"spec": f"{user_module}:has_digit", "file": module_file,
                                    "hash": hash_file(module_file)}
    assert sources[2]["plugin"]["hash"] == hash_file(recipe_folder / "my_checks.py")
    assert sources[4]["function"] == f"{user_module}:constant" and sources[4]["plugin"]["file"] == module_file
    assert "plugin" not in sources[1] and "function" not in sources[1]

    metrics = entry.manifest["metrics"]  # the evaluation hook ran the user checkers and metric too
    assert 0.0 <= metrics["has_digit_pass_rate"] <= 1.0 and metrics["nonempty_pass_rate"] >= 0.0
    assert metrics["mean_chars"] == pytest.approx(metrics["response_chars_mean"])
    assert [p["spec"] for p in metrics["eval_plugins"]] == [f"{user_module}:has_digit", "./my_checks.py:nonempty",
                                                            f"{user_module}:mean_chars"]


def test_a_user_checker_that_fails_stops_the_stage_naming_it_and_the_row(tmp_path, tiny_base, recipe_folder,
                                                                        user_module):
    recipe = _plugin_recipe(recipe_folder, tiny_base, user_module,
                            {"rewards": [{"checker": "./my_checks.py:fails_on_row"}]})
    with pytest.raises(PluginError, match=r"checker './my_checks.py:fails_on_row' raised ValueError: cannot read "
                                          r"this row \(at my_checks.py:\d+\) on prompt row \d+"):
        run_recipe(recipe, Registry(recipe_folder / "registry"), runs_root=recipe_folder / "runs")
