"""The verifiable checkers: answer extraction, per-checker args and their plan-time validation, the format
checkers, and the code checker's limits (time, memory, network) and partial credit."""

from __future__ import annotations

import time

import pytest

from align.rewards.checkers import CHECKERS, checker, get_checker

ADD_ONE = "Here you go:\n```python\ndef add_one(x):\n    return x + 1\n```\n"


def score(name: str, completion, row: dict | None = None, **args) -> float:
    return get_checker(name)(completion, row if row is not None else {}, **args)


# ------------------------------------------------------------------------------------------ math

@pytest.mark.parametrize("completion", [
    "3 + 4 = 7\n#### 7",
    "so the result is \\boxed{7}.",
    "The answer is 7.",
    "Answer: 7",
    "first 3, then 4, finally 7",
])
def test_math_answer_finds_the_final_answer(completion):
    assert score("math_answer", completion, {"answer": "7"}) == 1.0
    assert score("math_answer", completion, {"answer": "8"}) == 0.0


def test_math_answer_reads_commas_and_reference_formats():
    assert score("math_answer", "#### 1,234", {"answer": "1234"}) == 1.0
    assert score("math_answer", "#### 1234", {"answer": "blah\n#### 1,234"}) == 1.0
    assert score("math_answer", "#### 2.5", {"answer": 2.5}) == 1.0


def test_math_answer_tolerance_is_relative_and_an_argument():
    row = {"answer": "100"}
    assert score("math_answer", "#### 100.5", row) == 0.0
    assert score("math_answer", "#### 100.5", row, tolerance=0.01) == 1.0
    assert score("math_answer", "#### 102", row, tolerance=0.01) == 0.0


@pytest.mark.parametrize("completion", [None, "", "no digits here at all", "#### ", "\\boxed{}", 42, ["7"]])
def test_math_answer_scores_malformed_output_zero(completion):
    assert score("math_answer", completion, {"answer": "7"}) == 0.0


def test_a_checker_never_raises_on_a_bad_row_or_args():
    assert score("math_answer", "#### 7", {}) == 0.0  # no answer field
    assert get_checker("exact_match")("7", None) == 0.0
    assert score("math_answer", "#### 7", {"answer": "7"}, no_such_arg=1) == 0.0
    assert score("math_answer", "#### 7", {"answer": "7"}, tolerance="wide") == 0.0


def test_the_existing_checkers_work_without_args():
    assert score("answer_format", "blah #### 12") == 1.0 and score("answer_format", "12") == 0.0
    assert score("exact_match", "  yes \n", {"answer": "yes"}) == 1.0
    assert score("exact_match", "yes!", {"answer": "yes"}) == 0.0


# ------------------------------------------------------------------------------------------ regex

def test_regex_searches_by_default_and_full_matches_the_stripped_completion():
    assert score("regex", "reasoning...\n#### 7", pattern=r"####\s*\d+") == 1.0
    assert score("regex", "no marker", pattern=r"####") == 0.0
    assert score("regex", "  yes  \n", pattern=r"yes|no", full=True) == 1.0
    assert score("regex", "yes, definitely", pattern=r"yes|no", full=True) == 0.0
    assert score("regex", "yes, definitely", pattern=r"yes|no") == 1.0


def test_regex_without_a_pattern_or_with_a_bad_one_scores_zero():
    assert score("regex", "anything") == 0.0
    assert score("regex", "a(", pattern="a(") == 0.0


# ------------------------------------------------------------------------------------------ json

def test_json_valid_plain_fenced_and_invalid():
    assert score("json_valid", ' {"a": 1, "b": [2]} \n') == 1.0
    assert score("json_valid", "Sure:\n```json\n{\"a\": 1}\n```\nDone.") == 1.0
    assert score("json_valid", "[1, 2, 3]") == 1.0
    assert score("json_valid", "{'a': 1}") == 0.0
    assert score("json_valid", "```json\n{\"a\": 1,}\n```") == 0.0
    assert score("json_valid", "") == 0.0


def test_json_valid_required_keys_must_be_top_level_keys_of_an_object():
    keys = ["name", "age"]
    assert score("json_valid", '{"name": "x", "age": 3, "extra": 1}', required_keys=keys) == 1.0
    assert score("json_valid", '{"name": "x"}', required_keys=keys) == 0.0
    assert score("json_valid", '{"person": {"name": "x", "age": 3}}', required_keys=keys) == 0.0
    assert score("json_valid", '["name", "age"]', required_keys=keys) == 0.0


# ------------------------------------------------------------------------------------------ python_tests

def test_python_tests_passes_a_correct_function_and_fails_a_wrong_one():
    row = {"tests": "assert add_one(1) == 2\nassert add_one(-1) == 0"}
    assert score("python_tests", ADD_ONE, row) == 1.0
    assert score("python_tests", "def add_one(x):\n    return x + 2", row) == 0.0
    assert score("python_tests", "this is not python", row) == 0.0


def test_python_tests_takes_the_last_python_block():
    completion = "```python\ndef add_one(x):\n    return 0\n```\nFixed:\n" + ADD_ONE
    assert score("python_tests", completion, {"tests": "assert add_one(1) == 2"}) == 1.0


def test_an_early_exit_does_not_skip_the_tests():
    row = {"tests": "assert False"}
    assert score("python_tests", "import sys\nsys.exit(0)", row) == 0.0
    assert score("python_tests", "import os\nos._exit(0)", row) == 0.0


def test_python_tests_kills_a_program_that_runs_past_its_timeout():
    start = time.monotonic()
    assert score("python_tests", "while True:\n    pass", {"tests": "assert True"}, timeout=1) == 0.0
    assert time.monotonic() - start < 1 + 3


def test_python_tests_caps_memory():
    row = {"tests": "x = bytearray(2_000_000_000)\nassert len(x) > 0"}
    assert score("python_tests", ADD_ONE, row, memory_mb=256) == 0.0
    assert score("python_tests", ADD_ONE, {"tests": "x = bytearray(10_000_000)"}, memory_mb=256) == 1.0


def test_python_tests_has_no_network():
    add_one = "def add_one(x):\n    return x + 1\n"
    reach = "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n"
    assert score("python_tests", reach + add_one, {"tests": "assert add_one(1) == 2"}) == 0.0
    guarded = ("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
               "except OSError:\n    refused = True\nelse:\n    refused = False\n")
    assert score("python_tests", guarded + add_one, {"tests": "assert refused is True\nassert add_one(1) == 2"}) == 1.0


def test_partial_scores_the_share_of_tests_that_pass():
    row = {"tests": ["assert add_one(1) == 2", "assert add_one(2) == 3", "assert add_one(3) == 5"]}
    assert score("python_tests", ADD_ONE, row, partial=True) == pytest.approx(2 / 3)
    assert score("python_tests", ADD_ONE, row) == 0.0  # all or nothing by default


def test_python_tests_without_tests_scores_zero():
    assert score("python_tests", ADD_ONE, {"tests": ""}) == 0.0
    assert score("python_tests", ADD_ONE, {"tests": []}, partial=True) == 0.0


# ------------------------------------------------------------------------------------------ registry

def test_args_problem_names_unknown_missing_and_uncompilable_args():
    regex = get_checker("regex")
    unknown = regex.args_problem({"pattern": "x", "patern": "y"})
    assert unknown is not None and "'patern'" in unknown and "pattern" in unknown and "full" in unknown
    missing = regex.args_problem({"full": True})
    assert missing is not None and "'pattern'" in missing
    bad = regex.args_problem({"pattern": "a("})
    assert bad is not None and "does not compile" in bad and "missing )" in bad
    assert regex.args_problem({"pattern": "^####", "full": True}) is None
    assert get_checker("answer_format").args_problem({"x": 1}) is not None
    assert get_checker("math_answer").args_problem({}) is None
    assert get_checker("math_answer").args_problem({"tolerance": 0.01}) is None


def test_every_checker_declares_its_required_args_as_params():
    for check in CHECKERS.values():
        assert set(check.required) <= set(check.params), check.name
    with pytest.raises(ValueError, match="not in params"):
        checker("broken", params=(), required=("x",))


def test_an_unknown_checker_is_a_key_error_naming_it():
    with pytest.raises(KeyError, match="no_such_checker"):
        get_checker("no_such_checker")


def test_python_tests_contains_a_fork_bomb():
    import psutil

    bombs = ["import os\nwhile True:\n    os.fork()",
             "import subprocess, sys\nwhile True:\n"
             "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])",
             "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()",
             "import _posixsubprocess\n_posixsubprocess.fork_exec()",
             "import os\nos.system('sleep 60 &')"]
    for bomb in bombs:
        start = time.monotonic()
        assert score("python_tests", bomb, {"tests": "assert True"}, timeout=2) == 0.0, bomb
        assert time.monotonic() - start < 2 + 3, bomb
    assert psutil.Process().children(recursive=True) == []  # nothing the bombs started outlived the check


def test_python_tests_cannot_write_outside_its_folder(tmp_path):
    target = tmp_path / "escaped.txt"
    attempts = [f"open({str(target)!r}, 'w').write('x')",
                f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
                f"import os\nos.symlink('/etc/hostname', {str(target)!r})",
                f"import shutil\nshutil.copy(__file__, {str(target)!r})",
                f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'a').write('x')",
                "import ctypes\nctypes.CDLL(None).system(b'true')"]
    for attempt in attempts:
        assert score("python_tests", attempt, {"tests": "assert True"}) == 0.0, attempt
        assert not target.exists(), attempt
    (tmp_path / "kept.txt").write_text("original")
    remove = f"import os\nos.remove({str(tmp_path / 'kept.txt')!r})"
    assert score("python_tests", remove, {"tests": "assert True"}) == 0.0
    assert (tmp_path / "kept.txt").read_text() == "original"
    # Its own folder stays writable, and reading is allowed, so ordinary programs still pass.
    inside = ("import os, json\nopen('scratch.txt', 'w').write('x')\nos.makedirs('d/e')\n"
              "os.rename('scratch.txt', 'd/e/s.txt')\nassert open('d/e/s.txt').read() == 'x'\n"
              "import collections, decimal, fractions, itertools, re")
    assert score("python_tests", inside, {"tests": "assert True"}) == 1.0
