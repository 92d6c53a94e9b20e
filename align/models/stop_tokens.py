"""Which token ids end an assistant turn: the tokenizer's EOS and the chat template's end-of-turn token.

A chat model stops when it writes the token its template closes a turn with (`<|im_end|>` in ChatML),
which is not always the tokenizer's EOS (`<|endoftext|>` in many ChatML models). An exported model's
`generation_config.eos_token_id` must hold both, or transformers and vLLM generate past the answer.
The end-of-turn token is read from the template itself: render a conversation, and take the special
token that directly follows the assistant's text.
"""

from __future__ import annotations

import weakref

_MARK = "ALIGN_END_OF_TURN_PROBE"
# tokenizer -> (chat template, its end-of-turn id): read once per tokenizer and template, not once per
# conversation labelled or batch generated.
_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def template_end_token_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message, or None."""
    template = getattr(tokenizer, "chat_template", None)
    try:
        known = _END_OF_TURN.get(tokenizer)
    except TypeError:  # an object that cannot be weakly referenced: read it every time
        return _read_end_token_id(tokenizer)
    if known is not None and known[0] == template:
        return known[1]
    end = _read_end_token_id(tokenizer)
    _END_OF_TURN[tokenizer] = (template, end)
    return end


def _read_end_token_id(tokenizer) -> int | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _MARK}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this has no end token to read
        return None
    after = text[text.find(_MARK) + len(_MARK):] if _MARK in text else ""
    special = {tokenizer.convert_ids_to_tokens(i): i for i in tokenizer.all_special_ids}
    special.update({t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special})
    stripped = after.lstrip(" ")
    for token, token_id in sorted(special.items(), key=lambda kv: -len(kv[0])):
        if token and stripped.startswith(token):
            return token_id
    return None


def stop_token_ids(tokenizer, existing=None) -> list[int]:
    """EOS ids for a generation config: the template's end-of-turn token first, then the tokenizer's EOS,
    then any the model already had (`existing`: an int, a list, or None), without repeats."""
    ids = [template_end_token_id(tokenizer), tokenizer.eos_token_id]
    if isinstance(existing, int):
        ids.append(existing)
    elif existing:
        ids.extend(existing)
    return list(dict.fromkeys(i for i in ids if i is not None))
