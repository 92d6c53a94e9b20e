from __future__ import annotations

import copy

from align.registry.fingerprint import chat_template_hash, hash_json, tokenizer_hash


def test_tokenizer_hash_differs_between_tiny_tokenizers(chatml_tokenizer, llama2_tokenizer):
    assert tokenizer_hash(chatml_tokenizer) != tokenizer_hash(llama2_tokenizer)


def test_tokenizer_hash_is_stable(chatml_tokenizer):
    assert tokenizer_hash(chatml_tokenizer) == tokenizer_hash(chatml_tokenizer)
    assert len(tokenizer_hash(chatml_tokenizer)) == 16


def test_tokenizer_hash_changes_with_chat_template(chatml_tokenizer):
    other = copy.deepcopy(chatml_tokenizer)
    before = tokenizer_hash(other)
    other.chat_template = chatml_tokenizer.chat_template + "{# changed #}"
    assert chat_template_hash(other) != chat_template_hash(chatml_tokenizer)
    assert tokenizer_hash(other) != before
    # the session fixture itself is untouched
    assert tokenizer_hash(chatml_tokenizer) == before


def test_hash_json_is_key_order_independent():
    a = {"b": 1, "a": {"y": [1, 2], "x": "s"}}
    b = {"a": {"x": "s", "y": [1, 2]}, "b": 1}
    assert hash_json(a) == hash_json(b)


def test_hash_json_sees_value_changes():
    assert hash_json({"a": 1}) != hash_json({"a": 2})
    assert hash_json([1, 2]) != hash_json([2, 1])
