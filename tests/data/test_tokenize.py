from __future__ import annotations

import pytest

from align.data.tokenize import IGNORE, encode_conversation, encode_prompt, render

# The llama2 template writes ' ' + content + eos for an assistant turn; chatml writes the content as is.
ASSISTANT_PREFIX = {"chatml": "", "llama2": " "}

SINGLE = [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "The answer is 19."}]
MULTI = [
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "The answer is 19."},
    {"role": "user", "content": "Please write a short poem about the sea."},
    {"role": "assistant", "content": "#### 42"},
]
WITH_SYSTEM = [
    {"role": "system", "content": "Good answers are helpful."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Answer: 3 + 4 = 7"},
]


@pytest.fixture(params=["chatml", "llama2"])
def template(request):
    return request.param


@pytest.fixture
def tok(request, template):
    return request.getfixturevalue(f"{template}_tokenizer")


def labelled(encoded) -> list[int]:
    return [t for t in encoded.labels if t != IGNORE]


def expected_target(tok, template, messages) -> str:
    prefix = ASSISTANT_PREFIX[template]
    return "".join(prefix + m["content"] + tok.eos_token for m in messages if m["role"] == "assistant")


@pytest.mark.parametrize("messages", [SINGLE, WITH_SYSTEM], ids=["single", "system"])
def test_labels_decode_to_assistant_text_plus_eos(tok, template, messages):
    encoded = encode_conversation(tok, messages, max_length=512)
    assert len(encoded.labels) == len(encoded.input_ids)
    assert tok.decode(labelled(encoded)) == expected_target(tok, template, messages)
    # every label is either IGNORE or the input id at that position
    assert all(lab in (IGNORE, tid) for lab, tid in zip(encoded.labels, encoded.input_ids))


def test_multi_turn_labels_both_assistant_turns_and_no_user_text(tok, template):
    encoded = encode_conversation(tok, MULTI, max_length=512)
    text = tok.decode(labelled(encoded))
    assert text == expected_target(tok, template, MULTI)
    assert "The answer is 19." in text and "#### 42" in text
    for message in MULTI:
        if message["role"] == "user":
            assert message["content"] not in text
    assert "user" not in text and "[INST]" not in text
    # two labelled runs (one per assistant turn), separated by unlabelled user text
    runs, inside = 0, False
    for lab in encoded.labels:
        if lab != IGNORE and not inside:
            runs += 1
        inside = lab != IGNORE
    assert runs == 2


def test_eos_is_labelled_even_though_pad_is_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id  # both tiny tokenizers share pad and eos
    encoded = encode_conversation(tok, MULTI, max_length=512)
    eos_positions = [i for i, lab in enumerate(encoded.labels) if lab == tok.eos_token_id]
    assert len(eos_positions) == 2  # one end-of-turn per assistant turn
    for i in eos_positions:
        assert encoded.input_ids[i] == tok.eos_token_id
    assert encoded.trainable == len(labelled(encoded))


def test_llama2_has_exactly_one_bos(llama2_tokenizer):
    tok = llama2_tokenizer
    assert render(tok, SINGLE).startswith(tok.bos_token)  # the template writes the BOS itself
    for messages in (SINGLE, MULTI, WITH_SYSTEM):
        encoded = encode_conversation(tok, messages, max_length=512)
        assert encoded.input_ids[0] == tok.bos_token_id
        assert encoded.input_ids.count(tok.bos_token_id) == 1
        assert encoded.labels[0] == IGNORE
        prompt = encode_prompt(tok, messages[:-1])
        assert prompt.count(tok.bos_token_id) == 1


def test_chatml_does_not_start_with_two_bos(chatml_tokenizer):
    tok = chatml_tokenizer
    for messages in (SINGLE, MULTI, WITH_SYSTEM):
        encoded = encode_conversation(tok, messages, max_length=512)
        assert encoded.input_ids[:2] != [tok.bos_token_id, tok.bos_token_id]
        prompt = encode_prompt(tok, messages[:-1])
        assert prompt[:2] != [tok.bos_token_id, tok.bos_token_id]


@pytest.mark.parametrize("messages", [SINGLE, MULTI, WITH_SYSTEM], ids=["single", "multi", "system"])
def test_encode_prompt_ends_with_assistant_header(tok, template, messages):
    history = messages[:-1]
    prompt = encode_prompt(tok, history)
    text = tok.decode(prompt)
    header = "<|im_start|>assistant\n" if template == "chatml" else "[/INST]"
    assert text.endswith(header)
    for message in history:
        assert message["content"] in text
    assert messages[-1]["content"] not in text
    # the prompt is exactly the unlabelled prefix of the full training sequence
    encoded = encode_conversation(tok, messages, max_length=512)
    assert encoded.input_ids[: len(prompt)] == prompt
    assert encoded.labels[len(prompt) - 1] == IGNORE
    assert encoded.labels[len(prompt)] != IGNORE


@pytest.mark.parametrize("max_length", [5, 12, 20])
def test_truncation_keeps_length_within_max_length(tok, max_length):
    full = encode_conversation(tok, MULTI, max_length=512)
    assert len(full.input_ids) > max_length
    short = encode_conversation(tok, MULTI, max_length=max_length)
    assert len(short.input_ids) <= max_length
    assert len(short.labels) == len(short.input_ids)
    assert short.input_ids == full.input_ids[:max_length]
    assert short.labels == full.labels[:max_length]


def test_no_truncation_when_it_fits(tok):
    full = encode_conversation(tok, SINGLE, max_length=512)
    exact = encode_conversation(tok, SINGLE, max_length=len(full.input_ids))
    assert exact.input_ids == full.input_ids and exact.labels == full.labels


def test_assistant_only_false_labels_everything_but_bos(llama2_tokenizer):
    tok = llama2_tokenizer
    encoded = encode_conversation(tok, SINGLE, max_length=512, assistant_only=False)
    assert encoded.labels[0] == IGNORE
    assert encoded.labels[1:] == encoded.input_ids[1:]


def _plain_template(header_end: str) -> str:
    """A template that writes no EOS at all; the assistant header ends with `header_end`."""
    return ("{% for m in messages %}{{ m['role'] + ':' + ('" + header_end + "' if m['role'] == 'assistant' else ' ')"
            " + m['content'] + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant:" + header_end + "' }}{% endif %}")


def test_template_without_eos_gets_eos_added_and_labelled(chatml_tokenizer):
    import copy

    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = _plain_template("\\n")
    assert tok.eos_token not in render(tok, MULTI)
    encoded = encode_conversation(tok, MULTI, max_length=512)
    assert tok.decode(labelled(encoded)) == "The answer is 19." + tok.eos_token + "#### 42" + tok.eos_token
    assert encoded.input_ids.count(tok.eos_token_id) == 2


def test_header_ending_in_space_keeps_first_assistant_word(chatml_tokenizer):
    import copy

    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = _plain_template(" ")
    encoded = encode_conversation(tok, MULTI, max_length=512)
    text = tok.decode(labelled(encoded))
    assert "The answer is 19." in text
