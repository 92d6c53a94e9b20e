"""Batched generation from chat prompts, shared by the evaluation hook and RL rollouts.

Prompts are left-padded into batches sorted by length (less padding), generation stops per sequence at
EOS, and the result says for each response whether it ended with EOS (a model that never stops is a
failure we want to see, not hide).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from align.data.sampling import pad_left
from align.models import inference_autocast


@dataclass
class Generated:
    text: str
    token_ids: list[int]
    ended_with_eos: bool


def generation_kwargs(settings, tokenizer) -> dict:
    kwargs = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if settings.temperature and settings.temperature > 0:
        # Unset top-k/top-p mean none: transformers would otherwise apply its default top_k=50 silently.
        kwargs.update(do_sample=True, temperature=settings.temperature, top_k=settings.top_k or 0,
                      top_p=settings.top_p or 1.0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if settings.stop:
        kwargs["stop_strings"] = list(settings.stop)
        kwargs["tokenizer"] = tokenizer
    return kwargs


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], settings, batch_size: int = 16,
             autocast: bool = False) -> list[Generated]:
    """Responses in input order. `autocast`: sample under bf16 autocast where the hardware has it (RL
    rollouts, whose log-probs are recomputed in full precision afterwards)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[Generated | None] = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    kwargs = generation_kwargs(settings, tokenizer)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, attention = pad_left([prompt_ids[i] for i in chunk], pad)
        width = input_ids.size(1)
        with inference_autocast(model) if autocast else contextlib.nullcontext():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()
            ended = eos in new
            if ended:
                new = new[: new.index(eos) + 1]
            text = tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True)
            results[i] = Generated(text=text, token_ids=new, ended_with_eos=ended)
    if was_training:
        model.train()
    return results  # type: ignore[return-value]
