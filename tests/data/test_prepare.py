"""SFT data checks (`align.data.prepare`, as the SFT stage composes them): bad rows named by index or dropped
and counted, conversations with no trainable token left after truncation dropped and counted, and the run
refused when the dropped share passes `max_dropped_share`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from align.errors import DataError
from align.config.loading import validate_recipe
from align.stages.sft import prepare_data
from tests.conftest import SFT_ROWS, write_jsonl

LONG_PROMPT = {"prompt": "Please write a short poem about the sea. " * 20, "completion": "#### 42"}


def _prepare(tmp_path, tokenizer, rows, **stage):
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    raw = {"name": "t", "base": "unused", "stages": {"sft": {"data": str(data), "eval_split": 0.0, **stage}}}
    recipe = validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))
    ctx = SimpleNamespace(recipe=recipe, config=recipe.stages["sft"])
    return prepare_data(ctx, tokenizer)


def test_bad_rows_are_named_by_index_under_the_error_policy(tmp_path, chatml_tokenizer):
    rows = SFT_ROWS[:6] + [{"prompt": "What is 1 + 1?"}, {"prompt": "What is 2 + 2?", "completion": ""}]
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, chatml_tokenizer, rows, on_bad_rows="error")
    message = str(info.value)
    assert "2 bad row(s)" in message and "row 6" in message and "row 7" in message
    assert "completion" in message


def test_rows_truncated_to_nothing_trainable_are_dropped_and_counted(tmp_path, chatml_tokenizer):
    rows = SFT_ROWS + [LONG_PROMPT, LONG_PROMPT, {"prompt": "What is 2 + 2?", "completion": ""}]
    train, heldout, report = _prepare(tmp_path, chatml_tokenizer, rows, max_length=48, on_bad_rows="drop",
                                      max_dropped_share=0.2)
    assert len(train) == 16 and heldout == []
    assert report.dropped == {"no trainable tokens after truncation": 2, "empty response": 1}
    assert (report.rows, report.kept) == (19, 16)
    assert any(": row 16: no trainable tokens within max_length 48" in e for e in report.examples)
    assert all(any(label != -100 for label in e.labels) for e in train)


def test_too_large_a_dropped_share_stops_the_run(tmp_path, chatml_tokenizer):
    rows = SFT_ROWS[:8] + [LONG_PROMPT] * 2
    with pytest.raises(DataError, match=r"dropped 2 of 10 rows \(2 no trainable tokens after truncation\), more "
                                        r"than the allowed share 10% \(max_dropped_share\)"):
        _prepare(tmp_path, chatml_tokenizer, rows, max_length=48, max_dropped_share=0.1)


def test_a_row_dropped_as_too_long_is_named_by_its_file_row(tmp_path, chatml_tokenizer):
    """Not by its place among the training rows after a bad row was dropped and the held-out split taken
    (before: `example 5` for file row 7)."""
    rows = [dict(row) for row in SFT_ROWS]
    rows[2] = {"prompt": "What is 5 + 6?"}  # a bad row, dropped first: positions shift by one after it
    rows[7] = LONG_PROMPT
    _, _, report = _prepare(tmp_path, chatml_tokenizer, rows, max_length=48, eval_split=0.25, on_bad_rows="drop",
                            max_dropped_share=0.5)
    long = [e for e in report.examples if "no trainable tokens" in e]
    assert len(long) == 1 and ": row 7: no trainable tokens within max_length 48" in long[0], report.examples
    assert any(": row 2: missing field" in e for e in report.examples), report.examples
