"""One forward pass per shared prompt: rows that begin with the same prompt run it once.

Why: a preference pair's chosen and rejected sides share their prompt (on Anthropic HH harmless pairs,
most of each side's tokens), and RL scores k samples of each prompt. Teacher-forcing every row recomputes
that prompt on every row. Padding takes part of the saving back (responses pad to the batch's longest);
the measured gain is in docs/results.md.

How: each group's prompt runs once (left-padded, so every prompt ends at the same column), its KV cache is
repeated for the group's rows (a differentiable copy: the gradient of every response flows back into the
one prompt pass), and the responses run on top of it. The result is laid out exactly as the plain pass's
`last_hidden_state` is, so callers swap one for the other; parity tests hold them equal in fp32.
"""

from __future__ import annotations

import torch

from align.data.sampling import pad_left, pad_right
from align.models.renamed_arguments import cache_argument


def pair_groups(rows: int) -> list[list[int]]:
    """Groups for a pair batch laid out as [B chosen..., B rejected...]: row i with row B + i."""
    half = rows // 2
    return [[i, half + i] for i in range(half)]


def consecutive_groups(rows: int, k: int) -> list[list[int]]:
    """Groups of `k` consecutive rows (k samples of one prompt)."""
    return [list(range(g, g + k)) for g in range(0, rows, k)]


def _split(input_ids: torch.Tensor, lengths: list[int], starts: list[int],
           groups: list[list[int]]) -> tuple[list[list[int]], list[list[int]]] | None:
    """(one prompt per group, responses in group order), or None when the rows cannot share a pass."""
    k = len(groups[0])
    if k < 2 or any(len(g) != k for g in groups):
        return None
    prompts, responses = [], []
    for group in groups:
        first = group[0]
        start = starts[first]
        if start < 1:
            return None
        prompt = input_ids[first, :start]
        for row in group:
            if starts[row] != start or lengths[row] <= start or not torch.equal(input_ids[row, :start], prompt):
                return None
            responses.append(input_ids[row, start: lengths[row]].tolist())
        prompts.append(prompt.tolist())
    return prompts, responses


def _pad_states(rows: list[torch.Tensor], left: bool) -> torch.Tensor:
    """[n, width, H] from rows of [length, H], zero-padded on the left or the right."""
    width = max(r.size(0) for r in rows)
    pad = [(0, 0, width - r.size(0), 0) if left else (0, 0, 0, width - r.size(0)) for r in rows]
    return torch.stack([torch.nn.functional.pad(r, p) for r, p in zip(rows, pad)])


def shared_prompt_states(trunk, input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: list[int],
                         groups: list[list[int]], states: torch.Tensor | None = None) -> torch.Tensor | None:
    """`trunk(input_ids, attention_mask).last_hidden_state` for right-padded rows (zeros at padding), with
    each group's prompt (its rows' first `starts[row]` tokens, identical within a group) computed once.
    Groups must all have the same size k >= 2, and every row a response after its prompt. Returns None when
    the rows do not fit that shape (a prompt differs, a response is empty): the caller runs the plain pass.
    `states` [B, L, H]: the hidden states entering the trunk's first block, in the plain layout, instead of
    the token embeddings (a trunk cut to its top blocks, `align.models.logprobs.top_blocks`)."""
    from transformers import DynamicCache

    if trunk.training and any(getattr(m, "gradient_checkpointing", False) for m in trunk.modules()):
        return None  # checkpointed blocks drop the KV cache in training: nothing to share
    rows, width = input_ids.shape
    lengths = attention_mask.sum(dim=1).tolist()
    split = _split(input_ids, lengths, starts, groups)
    if split is None:
        return None
    prompts, responses = split
    k = len(groups[0])
    device = input_ids.device
    prompt_ids, prompt_mask = (t.to(device) for t in pad_left(prompts, 0))
    response_ids, response_mask = (t.to(device) for t in pad_right(responses, 0))
    if states is None:
        prompt_input, response_input = {"input_ids": prompt_ids}, {"input_ids": response_ids}
    else:  # the same rows' incoming states, cut and padded the same way
        prompt_input = {"inputs_embeds": _pad_states([states[g[0], : starts[g[0]]] for g in groups], left=True)}
        response_input = {"inputs_embeds": _pad_states([states[row, starts[row]: lengths[row]]
                                                         for g in groups for row in g], left=False)}
    cache = DynamicCache()
    cached = {cache_argument(trunk): cache, "use_cache": True}
    prompt_out = trunk(**prompt_input, attention_mask=prompt_mask, **cached,
                       position_ids=(prompt_mask.cumsum(dim=1) - 1).clamp(min=0)).last_hidden_state
    cache.batch_repeat_interleave(k)
    prompt_width = prompt_ids.size(1)
    group_starts = torch.tensor([starts[g[0]] for g in groups], device=device)
    response_out = trunk(**response_input, **cached,
                         attention_mask=torch.cat([prompt_mask.repeat_interleave(k, dim=0), response_mask], dim=1),
                         position_ids=group_starts.repeat_interleave(k)[:, None]
                         + torch.arange(response_ids.size(1), device=device)[None, :]).last_hidden_state

    # Scatter into the plain pass's layout: each row is its group's prompt states, then its response states.
    values, target_rows, target_cols = [], [], []
    for g, group in enumerate(groups):
        start = starts[group[0]]
        for j, row in enumerate(group):
            values += [prompt_out[g, prompt_width - start:], response_out[g * k + j, : lengths[row] - start]]
            target_rows.append(torch.full((lengths[row],), row, dtype=torch.long))
            target_cols.append(torch.arange(lengths[row]))
    states = prompt_out.new_zeros(rows, width, prompt_out.size(-1))
    index = (torch.cat(target_rows).to(device), torch.cat(target_cols).to(device))
    return states.index_put(index, torch.cat(values))
