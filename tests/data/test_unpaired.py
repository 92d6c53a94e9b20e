"""KTO's data (`align.data.unpaired`, `align.data.prepare_unpaired`): unpaired rows as text or chat messages,
preference pairs split into a desirable and an undesirable row, bad rows named by file and row and counted,
the held-out split by source row (a pairs file holds out what DPO holds out), each row's fixed mismatched
combination for the KL estimate, and the plan's checks and weight warning."""

from __future__ import annotations

import logging

import pytest

from align.config.loading import validate_recipe
from align.data.prepare import prepare_pairs
from align.data.prepare_unpaired import prepare_feedback
from align.data.tokenize import IGNORE
from align.data.unpaired import load_feedback
from align.errors import ConfigError, DataError
from align.pipeline.plan import make_plan
from align.registry.store import Registry
from tests.conftest import write_jsonl

UNPAIRED = [{"prompt": "Can you help me?", "completion": "Sure, glad to help.", "label": True},
            {"prompt": [{"role": "user", "content": "Help, please?"}],
             "completion": [{"role": "assistant", "content": "No. Go away."}], "label": False}]
PAIRS = [{"prompt": f"Question {i}: can you help?", "chosen": f"Of course, here is help {i}.",
          "rejected": f"No. Go away, {i}."} for i in range(12)]


def _recipe(tmp_path, rows, base="unused", **stage):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    raw = {"name": "t", "base": str(base), "stages": {"kto": {"data": str(data), "eval_split": 0.0, **stage}}}
    return validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))


def _prepare(tmp_path, tokenizer, rows, **stage):
    recipe = _recipe(tmp_path, rows, **stage)
    return prepare_feedback(recipe, recipe.stages["kto"], tokenizer)


def test_unpaired_rows_as_text_or_messages():
    feedback = load_feedback(UNPAIRED, "f.jsonl")
    assert feedback.format == "unpaired" and not feedback.problems
    assert [(r.index, r.desirable) for r in feedback.rows] == [(0, True), (1, False)]
    assert feedback.rows[0].prompt == [{"role": "user", "content": "Can you help me?"}]
    assert feedback.rows[1].completion == [{"role": "assistant", "content": "No. Go away."}]
    assert feedback.counts() == (1, 1)


def test_bad_rows_are_named_by_file_and_row_with_a_reason():
    rows = UNPAIRED + [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "b", "label": "yes"},
                       {"prompt": "a", "completion": "  ", "label": True}, {"completion": "b", "label": False},
                       {"prompt": "a", "completion": [{"role": "user", "content": "b"}], "label": True}]
    feedback = load_feedback(rows, "f.jsonl")
    found = {p.problem.where: (p.reason, p.problem.message) for p in feedback.problems}
    assert found["f.jsonl: row 2"] == ("missing field", "missing field `label`")
    assert found["f.jsonl: row 3"][0] == "malformed" and "true (desirable) or false" in found["f.jsonl: row 3"][1]
    assert found["f.jsonl: row 4"] == ("empty response", "empty completion")
    assert found["f.jsonl: row 5"] == ("missing field", "missing field `prompt`")
    assert "assistant turn" in found["f.jsonl: row 6"][1]
    assert len(feedback.rows) == 2


def test_a_file_of_neither_shape_or_another_format_is_refused():
    with pytest.raises(DataError, match="needs `prompt`, `completion` and `label`"):
        load_feedback([{"text": "hello"}], "f.jsonl")
    with pytest.raises(DataError, match="format 'messages' is not one a KTO stage reads"):
        load_feedback(UNPAIRED, "f.jsonl", "messages")


def test_pairs_split_into_a_desirable_and_an_undesirable_row_holding_out_what_dpo_holds_out(tmp_path,
                                                                                           chatml_tokenizer):
    recipe = _recipe(tmp_path, PAIRS, eval_split=0.25)
    train, heldout, report = prepare_feedback(recipe, recipe.stages["kto"], chatml_tokenizer)
    assert report.rows == 12 and report.kept == 12
    assert len(train) == 18 and len(heldout) == 6
    for rows in (train, heldout):
        for chosen, rejected in zip(rows[::2], rows[1::2]):  # a pair's rows: desirable, then undesirable
            assert chosen.from_pair and chosen.index == rejected.index
            assert (chosen.desirable, rejected.desirable) == (True, False)
            assert chosen.prompt_tokens == rejected.prompt_tokens
    dpo = validate_recipe({"name": "t", "base": "unused", "stages": {"dpo": {
        "data": recipe.stages["kto"].data.path, "eval_split": 0.25}}}, [], source=str(tmp_path / "r.yaml"))
    _, dpo_heldout, _ = prepare_pairs(dpo, dpo.stages["dpo"], chatml_tokenizer)
    assert sorted({r.index for r in heldout}) == sorted(p.index for p in dpo_heldout)
    assert [r.completion.input_ids for r in heldout[::2]] == [p.chosen.input_ids for p in dpo_heldout]


def test_each_row_gets_its_prompt_with_another_source_rows_completion(tmp_path, chatml_tokenizer):
    train, _, _ = _prepare(tmp_path, chatml_tokenizer, PAIRS)
    completions = {tuple(r.completion.input_ids[r.prompt_tokens:]): r.index for r in train}
    used = []
    for row in train:
        start = row.prompt_tokens
        mismatched = row.mismatched
        assert mismatched.input_ids[:start] == row.completion.input_ids[:start]  # its own prompt
        assert mismatched.labels[:start] == [IGNORE] * start and mismatched.labels[start] != IGNORE
        other = completions[tuple(mismatched.input_ids[start:])]  # another row's whole completion...
        assert other != row.index  # ...of another source row, never the other side of its own pair
        used.append(tuple(mismatched.input_ids[start:]))
    assert sorted(used) == sorted(completions)  # every completion once
    again, _, _ = _prepare(tmp_path, chatml_tokenizer, PAIRS)
    assert [r.mismatched.input_ids for r in again] == [r.mismatched.input_ids for r in train]  # fixed by seed
    none, _, _ = _prepare(tmp_path, chatml_tokenizer, PAIRS, kl_estimate="none")
    assert all(r.mismatched is None for r in none)


def test_bad_rows_refused_or_dropped_and_counted(tmp_path, chatml_tokenizer):
    rows = UNPAIRED * 3 + [{"prompt": "a", "completion": "b", "label": 1}]
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, chatml_tokenizer, rows, on_bad_rows="error")
    assert "1 bad row(s)" in str(info.value) and "row 6" in str(info.value)
    train, _, report = _prepare(tmp_path, chatml_tokenizer, rows, on_bad_rows="drop", max_dropped_share=0.2)
    assert len(train) == 6 and report.dropped == {"malformed": 1} and report.kept == 6
    with pytest.raises(DataError, match="more than the allowed share"):
        _prepare(tmp_path, chatml_tokenizer, rows, on_bad_rows="drop", max_dropped_share=0.1)


def test_imbalanced_rows_are_warned_about_with_the_weights_that_fix_them(tmp_path, chatml_tokenizer, caplog):
    rows = [UNPAIRED[0]] * 6 + [UNPAIRED[1]] * 2
    with caplog.at_level(logging.WARNING, logger="align.data.prepare_unpaired"):
        _prepare(tmp_path, chatml_tokenizer, rows)
    assert "desirable_weight in [0.333, 0.444] or undesirable_weight in [2.25, 3]" in caplog.text


def test_the_plan_names_bad_rows_and_warns_about_the_weights(tmp_path, tiny_base):
    rows = [UNPAIRED[0]] * 6 + [UNPAIRED[1]] * 2
    recipe = _recipe(tmp_path, rows, base=tiny_base)
    text = make_plan(recipe, Registry(tmp_path / "registry")).describe()
    assert "unpaired feedback (6 desirable, 2 undesirable)" in text
    assert "warning: 6 desirable and 2 undesirable rows" in text and "undesirable_weight in [2.25, 3]" in text
    balanced = _recipe(tmp_path, rows, base=tiny_base, undesirable_weight=2.5)
    assert "warning" not in make_plan(balanced, Registry(tmp_path / "registry")).describe()
    bad = _recipe(tmp_path, rows + [{"prompt": "a", "completion": "b"}], base=tiny_base, on_bad_rows="error")
    with pytest.raises(ConfigError) as info:
        make_plan(bad, Registry(tmp_path / "registry"))
    assert [(p.where, p.message) for p in info.value.problems] == [
        (f"stages.kto.data: {tmp_path / 'rows.jsonl'}: row 8", "missing field `label`")]
