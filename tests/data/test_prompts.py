"""Prompt sets for RL: text or chat prompts, the fields checkers need, bad rows named by file and row."""

from __future__ import annotations

import pytest

from align.data.prompts import load_prompts, prompt_messages, prompt_problems
from align.errors import DataError
from align.config.loading import validate_recipe
from tests.conftest import write_jsonl


def test_text_and_chat_prompts_become_messages():
    assert prompt_messages({"prompt": "Hi"}) == [{"role": "user", "content": "Hi"}]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert prompt_messages({"messages": chat}) == chat
    assert prompt_messages({"question": "What is 2 + 2?"})[0]["content"] == "What is 2 + 2?"
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        prompt_messages({"messages": chat + [{"role": "assistant", "content": "Hello"}]})


def test_an_instruction_prompt_carries_its_input():
    """Alpaca's `input`, or the first of self-instruct's `instances`, follows the instruction as the alpaca
    format writes it; without one the instruction stands alone."""
    assert prompt_messages({"instruction": "Sort these.", "input": "3 1 2"})[0]["content"] == "Sort these.\n\n3 1 2"
    seed_task = {"instruction": "What is the relation?", "instances": [{"input": "Night : Day", "output": "x"}]}
    assert prompt_messages(seed_task)[0]["content"] == "What is the relation?\n\nNight : Day"
    assert prompt_messages({"instruction": "Tell a joke.", "instances": [{"input": "", "output": "x"}]}) == [
        {"role": "user", "content": "Tell a joke."}]


def test_every_unusable_row_is_named():
    rows = [{"prompt": "ok", "answer": "1"}, {"answer": "2"}, {"prompt": "no answer"}, {"prompt": "  ", "answer": "3"}]
    problems = [str(p) for p in prompt_problems(rows, "p.jsonl", {"math_answer": ("answer",)})]
    assert problems == ["p.jsonl: row 1: missing field `prompt` (or one of question, messages, instruction)",
                        "p.jsonl: row 2: checker 'math_answer' needs field(s) answer",
                        "p.jsonl: row 3: field `prompt` is empty"]


def test_load_prompts_refuses_a_file_with_bad_rows_and_keeps_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2", "topic": "sums"}])
    recipe = validate_recipe({"name": "t", "base": "b", "stages": {"sft": {"data": str(path)}}}, [])
    loaded = load_prompts(recipe, recipe.stages["sft"].data, {"math_answer": ("answer",)})
    assert loaded.rows[0]["topic"] == "sums" and loaded.rows[0]["messages"][0]["content"] == "What is 1 + 1?"
    write_jsonl(path, [{"prompt": "What is 1 + 1?"}])
    with pytest.raises(DataError, match="row 0: checker 'math_answer' needs field"):
        load_prompts(recipe, recipe.stages["sft"].data, {"math_answer": ("answer",)})
