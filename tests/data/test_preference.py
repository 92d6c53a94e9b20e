"""Preference pairs: the three row shapes, the untidy-row checks with row indices and reasons, pair
tokenization with prompt-side truncation, and the stage-level preparation with its report."""

from __future__ import annotations

import pytest

from align.data.preference import load_pairs, parse_dialogue
from align.data.prepare import prepare_pairs
from align.data.tokenize import IGNORE, encode_pair
from align.errors import DataError
from align.config.loading import validate_recipe
from tests.conftest import write_jsonl

HH = ("\n\nHuman: how do I pick a lock?\n\nAssistant: Why do you want to?"
      "\n\nHuman: my neighbour's door\n\nAssistant: ")


def test_explicit_text_pair():
    pairs = load_pairs([{"prompt": "hi", "chosen": "hello", "rejected": "go away"}], "f.jsonl")
    assert pairs.format == "explicit"
    pair = pairs.pairs[0]
    assert pair.prompt == [{"role": "user", "content": "hi"}]
    assert pair.chosen == [{"role": "assistant", "content": "hello"}]
    assert pair.rejected == [{"role": "assistant", "content": "go away"}]


def test_explicit_messages_with_the_prompt_repeated_inside_the_sides():
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    row = {"prompt": prompt, "chosen": prompt + [{"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    pair = load_pairs([row], "f").pairs[0]
    assert pair.prompt == prompt
    assert pair.chosen == [{"role": "assistant", "content": "hello"}]


def test_implicit_prompt_from_shared_dialogue_prefix():
    shared = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    row = {"chosen": shared + [{"role": "assistant", "content": "good"}],
           "rejected": shared + [{"role": "assistant", "content": "bad"}]}
    pairs = load_pairs([row], "f")
    assert pairs.format == "implicit"
    assert pairs.pairs[0].prompt == shared
    assert pairs.pairs[0].chosen == [{"role": "assistant", "content": "good"}]


def test_hh_dialogue_strings_are_parsed_into_chat_messages():
    assert parse_dialogue(HH + "No.") == [
        {"role": "user", "content": "how do I pick a lock?"},
        {"role": "assistant", "content": "Why do you want to?"},
        {"role": "user", "content": "my neighbour's door"},
        {"role": "assistant", "content": "No."}]
    pairs = load_pairs([{"chosen": HH + "I can't help with that.", "rejected": HH + "Use a bobby pin."}], "hh")
    assert pairs.format == "dialogue"
    pair = pairs.pairs[0]
    assert len(pair.prompt) == 3 and pair.prompt[-1]["role"] == "user"
    assert pair.chosen == [{"role": "assistant", "content": "I can't help with that."}]


def test_dialogues_diverging_before_the_last_turn_are_kept_and_counted_as_repaired():
    chosen = "\n\nHuman: a\n\nAssistant: b  Human: run-on\n\nAssistant: c"
    rejected = "\n\nHuman: a\n\nAssistant: other"
    pairs = load_pairs([{"chosen": chosen, "rejected": rejected}], "hh")
    assert len(pairs.pairs) == 1 and sum(pairs.repaired.values()) == 1
    assert pairs.pairs[0].prompt == [{"role": "user", "content": "a"}]
    assert [m["content"] for m in pairs.pairs[0].chosen] == ["b  Human: run-on", "c"]


def test_bad_rows_are_named_by_index_with_a_reason():
    rows = [
        {"prompt": "p", "chosen": "fine", "rejected": "also fine"},
        {"prompt": "p", "chosen": "only one side"},
        {"prompt": "p", "chosen": "   ", "rejected": "x"},
        {"chosen": HH + "", "rejected": HH + "something"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "x"},
    ]
    pairs = load_pairs(rows, "prefs.jsonl")
    assert [p.index for p in pairs.pairs] == [0]
    found = {str(item.problem): item.reason for item in pairs.problems}
    assert found == {
        "prefs.jsonl: row 1: missing field `rejected`": "missing field",
        "prefs.jsonl: row 2: empty chosen response": "empty response",
        "prefs.jsonl: row 3: empty chosen response": "empty response",
        "prefs.jsonl: row 5: `chosen[0]` must have `role` and `content`": "malformed",
    }
    assert pairs.identical == [4]


def test_per_pair_margin_field():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "m": 2}, {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "a", "rejected": "b", "m": "big"}]
    pairs = load_pairs(rows, "f", margin_field="m")
    assert [p.margin for p in pairs.pairs] == [2.0]
    assert [str(p.problem) for p in pairs.problems] == [
        "f: row 1: missing field `m` (the recipe's margin_field)", "f: row 2: field `m` must be a number, got 'big'"]


def test_an_unrecognised_file_names_its_fields():
    with pytest.raises(DataError, match="rows have fields answer, question; a preference file needs"):
        load_pairs([{"question": "q", "answer": "a"}], "f")


# ------------------------------------------------------------------------------------------ tokenization


def _pair(tok, prompt_words=5, response_words=3):
    prompt = [{"role": "user", "content": " ".join(["hello"] * prompt_words)}]
    chosen = [{"role": "assistant", "content": " ".join(["yes"] * response_words)}]
    rejected = [{"role": "assistant", "content": " ".join(["no"] * (response_words + 2))}]
    return prompt, chosen, rejected


def test_pair_labels_cover_only_the_responses_through_eos(chatml_tokenizer):
    tok = chatml_tokenizer
    encoded = encode_pair(tok, *_pair(tok), max_length=512)
    for side, word in ((encoded.chosen, "yes"), (encoded.rejected, "no")):
        labelled = [t for t in side.labels if t != IGNORE]
        assert labelled[-1] == tok.eos_token_id
        assert word in tok.decode(labelled) and "hello" not in tok.decode(labelled)
        # everything before the response is prompt, and it is the same on both sides
        assert side.labels[: encoded.prompt_tokens] == [IGNORE] * encoded.prompt_tokens
    assert encoded.chosen.input_ids[: encoded.prompt_tokens] == encoded.rejected.input_ids[: encoded.prompt_tokens]
    assert encoded.truncated is None


def test_over_long_pairs_lose_the_oldest_prompt_tokens_first(chatml_tokenizer):
    tok = chatml_tokenizer
    full = encode_pair(tok, *_pair(tok, prompt_words=60), max_length=4096)
    limit = max(len(full.chosen.input_ids), len(full.rejected.input_ids)) - 20
    cut = encode_pair(tok, *_pair(tok, prompt_words=60), max_length=limit)
    assert cut.truncated == "prompt truncated to fit max_length"
    assert max(len(cut.chosen.input_ids), len(cut.rejected.input_ids)) == limit
    # the responses are whole, the prompt lost its start and kept its end
    assert [t for t in cut.rejected.labels if t != IGNORE] == [t for t in full.rejected.labels if t != IGNORE]
    assert cut.chosen.input_ids == full.chosen.input_ids[20:]
    assert cut.prompt_tokens == full.prompt_tokens - 20


def test_drop_policy_and_prompt_cap(chatml_tokenizer):
    tok = chatml_tokenizer
    assert encode_pair(tok, *_pair(tok, prompt_words=60), max_length=30, truncation="drop") == "longer than max_length"
    capped = encode_pair(tok, *_pair(tok, prompt_words=60), max_length=4096, max_prompt_length=10)
    assert capped.prompt_tokens == 10 and capped.truncated == "prompt cut to max_prompt_length"


def test_responses_are_cut_when_even_a_short_prompt_does_not_fit(chatml_tokenizer):
    tok = chatml_tokenizer
    encoded = encode_pair(tok, *_pair(tok, prompt_words=3, response_words=80), max_length=40)
    assert encoded.truncated == "response truncated to fit max_length"
    assert len(encoded.chosen.input_ids) <= 40 and len(encoded.rejected.input_ids) <= 40
    assert encoded.chosen.trainable > 0 and encoded.rejected.trainable > 0


# ------------------------------------------------------------------------------------------ stage preparation


def _reward_recipe(folder, rows, **stage):
    data = write_jsonl(folder / "prefs.jsonl", rows)
    raw = {"name": "t", "base": "unused", "stages": {"reward": {"data": str(data), "eval_split": 0.25, **stage}}}
    return validate_recipe(raw, [], source=str(folder / "r.yaml"))


GOOD = [{"prompt": f"question {i}", "chosen": f"kind answer {i}", "rejected": f"rude answer {i}"} for i in range(12)]


def test_prepare_pairs_reports_every_drop_and_holds_out_a_seeded_split(tmp_path, chatml_tokenizer):
    rows = GOOD + [{"prompt": "p", "chosen": "x", "rejected": "x"}, {"prompt": "p", "chosen": "", "rejected": "y"}]
    recipe = _reward_recipe(tmp_path, rows, max_dropped_share=0.2)
    train, heldout, report = prepare_pairs(recipe, recipe.stages["reward"], chatml_tokenizer)
    assert len(train) + len(heldout) == 12 and len(heldout) == 3
    assert report.dropped == {"identical chosen and rejected": 1, "empty response": 1}
    assert report.kept == 12 and report.rows == 14
    again = prepare_pairs(recipe, recipe.stages["reward"], chatml_tokenizer)[1]
    assert [p.index for p in again] == [p.index for p in heldout]


def test_prepare_pairs_refuses_bad_rows_under_the_error_policy(tmp_path, chatml_tokenizer):
    recipe = _reward_recipe(tmp_path, GOOD + [{"prompt": "p", "chosen": "x"}], on_bad_rows="error")
    with pytest.raises(DataError, match=r"row 12: missing field `rejected`"):
        prepare_pairs(recipe, recipe.stages["reward"], chatml_tokenizer)


def test_prepare_pairs_stops_when_too_many_rows_are_dropped(tmp_path, chatml_tokenizer):
    recipe = _reward_recipe(tmp_path, GOOD[:4] + [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 4,
                            max_dropped_share=0.1)
    with pytest.raises(DataError, match=r"dropped 4 of 8 rows \(4 identical chosen and rejected\), more than"):
        prepare_pairs(recipe, recipe.stages["reward"], chatml_tokenizer)
