"""Batched generation from chat prompts, shared by the evaluation hook, RL rollouts and `align chat`.

Prompts are left-padded into batches sorted by length (less padding), generation stops per sequence at
the end of an assistant turn or a stop string, and the result says for each response whether it ended
properly (a model that never stops is a failure we want to see, not hide). The end of a turn is any of
`align.models.stop_tokens.stop_token_ids`: the chat template's end-of-turn token and the tokenizer's EOS,
which differ in Gemma (`<end_of_turn>`, `<eos>`), Phi-3 and Qwen base models; stopping at the EOS alone
would run every answer of those to `max_new_tokens`.

Decoding strategies are transformers' own (`generate`: greedy, sampling with temperature/top-k/top-p,
beam search, repetition penalty, min_new_tokens, stop strings); the one piece it lacks, OpenAI's presence
and frequency penalties, is a small `LogitsProcessor` here, applied to the raw logits before temperature
and top-k/top-p (transformers runs custom processors before its sampling warpers).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from align.data.sampling import pad_left
from align.models.loading import contiguous_head_input
from align.models.stop_tokens import stop_token_ids
from align.runtime.precision import inference_autocast


@dataclass
class Generated:
    text: str
    token_ids: list[int]
    ended_with_eos: bool
    # The sampler's log-prob of each of `token_ids` (`align.rl.sampler.sampled_logps`); None from `generate`,
    # which does not return them.
    token_logps: list[float] | None = None


class PresenceFrequencyPenalty:
    """OpenAI's penalties: logit[j] -= frequency * count[j] + presence * (count[j] > 0), where count[j] is how
    often token j occurs in the response so far (positions from `prompt_length` on; the prompt is not counted).
    Negative values encourage repetition instead. A transformers `LogitsProcessor` (by its call signature;
    not subclassed, so that importing align does not import transformers)."""

    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if generated.numel() == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def library_only_settings(settings) -> list[str]:
    """The settings that only transformers' `generate` implements (RL's own sampler does temperature,
    top-k, top-p, stop strings and max_new_tokens), by name, where they are set to a non-default value."""
    defaults = {"num_beams": 1, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "min_new_tokens": 0}
    return [name for name, default in defaults.items() if getattr(settings, name, default) != default]


def generation_kwargs(settings, tokenizer, prompt_length: int | None = None) -> dict:
    """`model.generate` arguments for `settings`. Settings left at their defaults are not passed, so a recipe
    without them decodes exactly as before they existed. `prompt_length`: the (padded) prompt width, which
    the presence/frequency penalty needs to count response tokens only. Generation ends at any of the
    turn's end ids (`stop_token_ids`)."""
    ends = stop_token_ids(tokenizer)
    kwargs = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": ends if len(ends) > 1 else (ends[0] if ends else None)}
    if settings.temperature and settings.temperature > 0:
        # Unset top-k/top-p mean none: transformers would otherwise apply its default top_k=50 silently.
        kwargs.update(do_sample=True, temperature=settings.temperature, top_k=settings.top_k or 0,
                      top_p=settings.top_p or 1.0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if settings.stop:
        kwargs["stop_strings"] = list(settings.stop)
        kwargs["tokenizer"] = tokenizer
    num_beams = getattr(settings, "num_beams", 1)
    if num_beams > 1:
        kwargs.update(num_beams=num_beams, num_return_sequences=1)
    if getattr(settings, "repetition_penalty", 1.0) != 1.0:
        kwargs["repetition_penalty"] = settings.repetition_penalty
    if getattr(settings, "min_new_tokens", 0):
        kwargs["min_new_tokens"] = settings.min_new_tokens
    presence, frequency = getattr(settings, "presence_penalty", 0.0), getattr(settings, "frequency_penalty", 0.0)
    if presence or frequency:
        if prompt_length is None:
            raise ValueError("presence/frequency penalties need the prompt length")
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([PresenceFrequencyPenalty(presence, frequency, prompt_length)])
    return kwargs


def finish_response(tokenizer, new: list[int], stops: list[str], ends: list[int] | None = None) -> Generated:
    """A response from the tokens generated after the prompt: cut after the first end-of-turn id (`ends`,
    by default `stop_token_ids(tokenizer)`), else after the token that completed the first stop string (both
    are proper ends); padding after either is dropped."""
    ends = set(stop_token_ids(tokenizer) if ends is None else ends)
    first_end = next((i for i, token in enumerate(new) if token in ends), None)
    ended = first_end is not None
    if ended:
        new = new[: first_end + 1]
    if stops:  # checked before the EOS too: where pad == EOS, the padding after a stop string reads as EOS
        body = new[:-1] if ended else new
        if any(stop in tokenizer.decode(body, skip_special_tokens=True) for stop in stops):
            for end in range(1, len(body) + 1):
                if any(stop in tokenizer.decode(body[:end], skip_special_tokens=True) for stop in stops):
                    new, ended = body[:end], True
                    break
    text = tokenizer.decode([t for t in new if t not in ends], skip_special_tokens=True)
    return Generated(text=text, token_ids=new, ended_with_eos=ended)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], settings, batch_size: int = 16,
             autocast: bool = False, streamer=None, stop=None) -> list[Generated]:
    """Responses in input order. `autocast`: sample under bf16 autocast where the hardware has it (RL
    rollouts, whose log-probs are recomputed in full precision afterwards). `streamer`: a transformers
    streamer that receives each new token (one prompt at a time; not with beam search). `stop`: a
    `threading.Event`; once it is set, generation ends after the token in progress (the playground's
    stop button), and what was generated so far is returned, not ended with EOS."""
    if streamer is not None and len(prompt_ids) != 1:
        raise ValueError("a streamer follows one prompt at a time")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[Generated | None] = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    contiguous_head_input(model)
    stops = list(settings.stop or [])
    ends = stop_token_ids(tokenizer)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, attention = pad_left([prompt_ids[i] for i in chunk], pad)
        width = input_ids.size(1)
        kwargs = generation_kwargs(settings, tokenizer, prompt_length=width)
        if streamer is not None:
            kwargs["streamer"] = streamer
        if stop is not None:
            kwargs["stopping_criteria"] = _stop_when_set(stop)
        with inference_autocast(model) if autocast else contextlib.nullcontext():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        for row, i in enumerate(chunk):
            results[i] = finish_response(tokenizer, out[row, width:].tolist(), stops, ends)
    if was_training:
        model.train()
    return results  # type: ignore[return-value]


def _stop_when_set(event):
    """A transformers `StoppingCriteriaList` that ends every sequence once `event` is set."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhenSet()])


def settings_with(base, overrides: dict):
    """`base` (GenerationSettings) with command-line values (None = not given), validated as a recipe's
    would be; a bad value raises one `ConfigError` naming its flag."""
    from pydantic import ValidationError

    from align.errors import ConfigError, Problem
    from align.config.schema import GenerationSettings

    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return GenerationSettings.model_validate({**base.model_dump(), **given})
    except ValidationError as err:
        problems = [Problem("--" + "-".join(str(p) for p in e["loc"]).replace("_", "-") if e["loc"] else "generation",
                            e["msg"].removeprefix("Value error, ")) for e in err.errors()]
        raise ConfigError(problems) from None
