"""Chat-template tokenization with assistant-only labels, the end-of-turn token labelled.

Why our own: most chat templates lack the `{% generation %}` markers that library masking relies on,
and masking by token id drops the EOS label when pad == EOS (SmolLM2, many others): the model then never
learns to stop. We render the conversation with the tokenizer's own template, find each assistant
turn's character span by rendering the prefix before it (templates are prefix-stable), and label the
tokens that overlap a span, through the end-of-turn token. Labels are explicit, so padding and
collation can never unlabel EOS.

The end of a turn is the token the template writes right after an answer (`align.models.stop_tokens`:
`<end_of_turn>` in Gemma, `<|end|>` in Phi-3, `<|im_end|>` in ChatML), which is not always the tokenizer's
EOS; only a template that writes none gets the EOS added. Each turn is found in the full rendering, from
where the prompt rendering with the assistant header ends: a template that renders the last answer
differently from earlier ones (Qwen3's empty `<think>` block) or closes the conversation with an extra
token (Phi-3's EOS) still labels exactly what it writes for each answer.

A template without a system role (Gemma 2's raises on one) gets the system prompt folded into the first
user turn, as Gemma 3's own template does (`system + "\n\n" + user`), logged once per template.

BOS: the template text is tokenized without added special tokens; if the tokenizer normally prepends a
BOS and the template did not write one, one is prepended. A sequence never starts with two BOS tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from align.errors import DataError
from align.models.stop_tokens import template_end_token_id

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; give the base a tokenizer with one")
    if messages and messages[0]["role"] == "system" and not accepts_system_role(tokenizer):
        messages = fold_system_prompt(messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_SYSTEM_ROLE: dict[str, bool] = {}  # chat template text -> whether it renders a system message


def accepts_system_role(tokenizer) -> bool:
    """Whether the chat template renders a leading system message; False only when it raises on one and
    renders the same conversation without it (Gemma 2: `System role not supported`)."""
    template = tokenizer.chat_template
    if template not in _SYSTEM_ROLE:
        user = [{"role": "user", "content": "hi"}]
        try:
            tokenizer.apply_chat_template([{"role": "system", "content": "be brief"}, *user], tokenize=False)
            accepts = True
        except Exception:  # noqa: BLE001 - jinja's TemplateError from raise_exception, or the template's own
            try:
                tokenizer.apply_chat_template(user, tokenize=False)
                accepts = False
            except Exception:  # noqa: BLE001 - it fails without a system message too: not about the role
                accepts = True
        if not accepts:
            log.warning("the chat template has no system role: system prompts are folded into the first user "
                        "turn (system + blank line + user), as Gemma 3's template does")
        _SYSTEM_ROLE[template] = accepts
    return _SYSTEM_ROLE[template]


def fold_system_prompt(messages: list[dict]) -> list[dict]:
    """The conversation with its leading system message put before the first user message's text."""
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise DataError("the chat template has no system role, and this conversation's system message is not "
                        "followed by a user message to fold it into")
    first = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [first, *messages[2:]]


def adds_bos(tokenizer) -> bool:
    """Whether this tokenizer prepends BOS on its own when asked for special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _encode_text(tokenizer, text: str, offsets: bool = False):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    ids = list(enc["input_ids"])
    spans = list(enc["offset_mapping"]) if offsets else None
    bos = tokenizer.bos_token_id
    if adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        if spans is not None:
            spans.insert(0, (0, 0))
    return ids, spans


def end_of_turn_text(tokenizer) -> str | None:
    """The text of the token the chat template closes an answer with (None: it writes none)."""
    end = template_end_token_id(tokenizer)
    return tokenizer.convert_ids_to_tokens(end) if end is not None else None


def assistant_spans(tokenizer, messages: list[dict], first: int = 0) -> tuple[str, list[tuple[int, int]], list[bool]]:
    """The rendered text, the character span of each assistant turn from message `first` on (content
    through end-of-turn), and for each span whether the template wrote an end-of-turn token there."""
    full = render(tokenizer, messages)
    end_text = end_of_turn_text(tokenizer)
    eos = tokenizer.eos_token or ""
    spans, found_end = [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        if not full.startswith(before):
            raise _not_prefix_stable()
        start = len(before)
        end_at = full.find(end_text, start) if end_text else -1
        if end_at >= 0:  # the template's own end of turn, where it wrote it in the full conversation
            spans.append((start, end_at + len(end_text)))
            found_end.append(True)
            continue
        through = render(tokenizer, messages[: i + 1])
        if not full.startswith(through) or not through.startswith(before):
            raise _not_prefix_stable()
        end_of_turn = through.find(eos, start) if eos else -1
        if end_of_turn >= 0:
            spans.append((start, end_of_turn + len(eos)))
            found_end.append(True)
        else:
            spans.append((start, len(through.rstrip())))
            found_end.append(False)
    return full, spans, found_end


def _not_prefix_stable() -> DataError:
    return DataError("the chat template is not prefix-stable (rendering a conversation changes earlier turns), "
                     "so assistant tokens cannot be located; use a template without that behaviour")


def encode_conversation(tokenizer, messages: list[dict], max_length: int | None,
                        assistant_only: bool = True, label_from: int = 0) -> Encoded:
    """Token ids and labels for one conversation, truncated from the right to `max_length` (None: no limit).
    Assistant turns before message `label_from` are context, not labelled (a preference pair's prompt)."""
    full, spans, found_eos = assistant_spans(tokenizer, messages, first=label_from)
    ids, offsets = _encode_text(tokenizer, full, offsets=True)
    labelled = [False] * len(ids)
    for (start, end), has_eos in zip(spans, found_eos):
        last = None
        for t, (s, e) in enumerate(offsets):
            if s < end and e > start:  # overlaps the span: a header space merged into the first word counts
                labelled[t] = True
                last = t
        if not has_eos and last is not None:  # template writes no EOS: add one after the turn
            ids.insert(last + 1, tokenizer.eos_token_id)
            offsets.insert(last + 1, (end, end))
            labelled.insert(last + 1, True)
    if not assistant_only:
        labelled = [True] * len(ids)
        if ids and ids[0] == tokenizer.bos_token_id:
            labelled[0] = False
    if max_length is not None:
        ids, labelled = ids[:max_length], labelled[:max_length]
    labels = [tok if keep else IGNORE for tok, keep in zip(ids, labelled)]
    return Encoded(input_ids=ids, labels=labels)


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for generation: the conversation so far plus the assistant header."""
    ids, _ = _encode_text(tokenizer, render(tokenizer, messages, add_generation_prompt=True))
    return ids


@dataclass
class EncodedPair:
    """Both sides of a preference pair over one shared (possibly truncated) prompt of `prompt_tokens`."""

    chosen: Encoded
    rejected: Encoded
    prompt_tokens: int
    index: int = -1
    margin: float | None = None
    truncated: str | None = None  # what was cut to fit, for the data report

    @property
    def tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


MIN_PROMPT_TOKENS = 8


def encode_pair(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict], max_length: int,
                max_prompt_length: int | None = None, truncation: str = "prompt") -> EncodedPair | str:
    """Tokenize both sides with the chat template (`encode_responses`); labels cover the responses'
    assistant turns through EOS. Returns the pair, or the reason it was refused (for the data report)."""
    encoded = encode_responses(tokenizer, prompt, [chosen, rejected], max_length, max_prompt_length, truncation)
    if isinstance(encoded, str):
        return encoded
    (chosen_ids, rejected_ids), prompt_tokens, truncated = encoded
    return EncodedPair(chosen=chosen_ids, rejected=rejected_ids, prompt_tokens=prompt_tokens, truncated=truncated)


def encode_responses(tokenizer, prompt: list[dict], responses: list[list[dict]], max_length: int,
                     max_prompt_length: int | None = None,
                     truncation: str = "prompt") -> tuple[list[Encoded], int, str | None] | str:
    """Tokenize each response after one shared prompt (a preference pair's two sides; a KTO row's one), labels
    on the responses' assistant turns through EOS. Returns (the encoded responses, the prompt's tokens left,
    what was cut to fit or None), or the reason they were refused (a short string for the data report).

    Over-long rows: with `truncation="prompt"` the oldest prompt tokens go first (every response loses the
    same ones, keeping at least the last few), then responses are cut on the right; with `"drop"` they are
    refused. `max_prompt_length` caps the prompt in either mode."""
    sides = [encode_conversation(tokenizer, prompt + side, None, label_from=len(prompt)) for side in responses]
    starts = [next((i for i, x in enumerate(e.labels) if x != IGNORE), len(e.labels)) for e in sides]
    prompt_len = min(starts)
    cut, truncated = 0, None
    if max_prompt_length is not None and prompt_len > max_prompt_length:
        cut, truncated = prompt_len - max_prompt_length, "prompt cut to max_prompt_length"
    longest = max(len(e.input_ids) for e in sides)
    over = longest - cut - max_length
    if over > 0:
        if truncation == "drop":
            return "longer than max_length"
        more = min(over, max(prompt_len - cut - min(prompt_len, MIN_PROMPT_TOKENS), 0))
        cut += more
        truncated = "prompt truncated to fit max_length"
        if over > more:
            truncated = "response truncated to fit max_length"
    out = [Encoded(e.input_ids[cut:cut + max_length], e.labels[cut:cut + max_length]) for e in sides]
    if any(e.trainable == 0 for e in out):
        return "no response tokens within max_length"
    return out, prompt_len - cut, truncated
