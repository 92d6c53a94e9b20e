from __future__ import annotations

import pytest

from align.data.formats import detect_format, load_conversations, to_conversation
from align.errors import DataError

SOURCE = "data/train.jsonl"


def convo(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


@pytest.mark.parametrize("row, fmt, expected", [
    ({"messages": [{"role": "system", "content": "Be brief."}, *convo("Hi", "Hello")]}, "messages",
     [{"role": "system", "content": "Be brief."}, *convo("Hi", "Hello")]),
    ({"prompt": "What is 12 + 7?", "completion": "19"}, "prompt_completion", convo("What is 12 + 7?", "19")),
    ({"question": "What is 3 + 4?", "answer": "7"}, "prompt_completion", convo("What is 3 + 4?", "7")),
    ({"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]},
     "prompt_completion", convo("Hi", "Yo")),
    ({"instruction": "Write a poem.", "input": "About the sea.", "output": "Waves."}, "alpaca",
     convo("Write a poem.\n\nAbout the sea.", "Waves.")),
    ({"instruction": "Write a poem.", "output": "Waves."}, "alpaca", convo("Write a poem.", "Waves.")),
    ({"instruction": "Write a poem.", "input": "", "output": "Waves."}, "alpaca", convo("Write a poem.", "Waves.")),
], ids=["messages", "prompt_completion", "question_answer", "prompt_completion_lists", "alpaca_input",
        "alpaca_no_input", "alpaca_empty_input"])
def test_formats_normalize_to_messages(row, fmt, expected):
    assert detect_format(row) == fmt
    assert to_conversation(row, fmt) == expected
    result = load_conversations([row], "auto", SOURCE)
    assert result.format == fmt
    assert result.rows == [expected]
    assert result.problems == []
    assert result.dropped == 0


def test_messages_extra_keys_are_dropped():
    row = {"messages": [{"role": "user", "content": "Hi", "name": "x"}, {"role": "assistant", "content": "Yo"}]}
    assert to_conversation(row, "messages") == convo("Hi", "Yo")


def test_bad_rows_are_problems_and_good_rows_kept():
    rows = [
        {"prompt": "a", "completion": "1"},
        {"prompt": "b"},                      # missing completion
        {"prompt": "c", "completion": "3"},
        {"prompt": "d", "completion": "   "},  # empty assistant output
        {"prompt": "e", "completion": "5"},
    ]
    result = load_conversations(rows, "auto", SOURCE)
    assert result.format == "prompt_completion"
    assert result.kept_index == [0, 2, 4]
    assert result.rows == [convo("a", "1"), convo("c", "3"), convo("e", "5")]
    assert result.total == 5 and result.dropped == 2
    assert [p.where for p in result.problems] == [f"{SOURCE}: row 1", f"{SOURCE}: row 3"]
    assert "completion" in result.problems[0].message and "missing" in result.problems[0].message
    assert "completion" in result.problems[1].message and "empty" in result.problems[1].message


def test_empty_assistant_message_in_messages_format():
    rows = [{"messages": convo("Hi", "Hello")}, {"messages": convo("Hi", "")},
            {"messages": [{"role": "user", "content": "only a question"}]}]
    result = load_conversations(rows, "messages", SOURCE)
    assert result.kept_index == [0]
    assert [p.where for p in result.problems] == [f"{SOURCE}: row 1", f"{SOURCE}: row 2"]
    assert "empty assistant" in result.problems[0].message
    assert "no assistant message" in result.problems[1].message


def test_alpaca_empty_output_is_a_problem():
    rows = [{"instruction": "x", "output": "y"}, {"instruction": "x", "output": ""}]
    result = load_conversations(rows, "alpaca", SOURCE)
    assert result.kept_index == [0]
    assert [p.where for p in result.problems] == [f"{SOURCE}: row 1"]
    assert "output" in result.problems[0].message


def test_bad_role_is_named():
    rows = [{"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    result = load_conversations(rows, "messages", SOURCE)
    assert result.rows == []
    assert "`messages[0].role`" in result.problems[0].message


def test_auto_detection_failure_lists_fields():
    with pytest.raises(DataError) as info:
        load_conversations([{"text": "hello", "label": 1}], "auto", SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: ")
    assert "label, text" in message
    assert "messages" in message and "instruction" in message


def test_non_demonstration_format_is_refused():
    with pytest.raises(DataError, match="not a demonstration format"):
        load_conversations([{"prompt": "a", "chosen": "b", "rejected": "c"}], "preference", SOURCE)
