"""Split a batch of preference pairs (or of SFT rows) into several forward/backward passes under a token budget.

Why: on a CPU a pass over 16 rows of 384 tokens is slower per token than two passes over 8 rows each (the
activations of the big pass are freshly faulted in every step and fall out of every cache; figures in
docs/results.md). The optimizer step is unchanged: each pass's loss is weighted by its share of
the batch's pairs and the gradients add up to the whole batch's (the losses are means over pairs).

Pairs are laid out as the collators make them: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}],
right-padded. A pass keeps both rows of each of its pairs, passes are formed from pairs sorted by length
(so each pass trims its own padding), and per-pair values (margins) follow their pairs. SFT batches split
by rows the same way (`split_row_batch`); there the caller weights each pass by its labelled tokens.
"""

from __future__ import annotations

import math

import torch


def split_pair_batch(inputs: dict, max_tokens: int | None) -> list[tuple[dict, float]]:
    """[(pass inputs, weight)], weights summing to 1; the batch itself (weight 1) when it fits `max_tokens`
    padded tokens (rows x width) or holds one pair."""
    ids = inputs["input_ids"]
    rows, width = ids.shape
    pairs = rows // 2
    if not max_tokens or rows * width <= max_tokens or pairs < 2 or rows != 2 * pairs:
        return [(inputs, 1.0)]
    lengths, right_padded = _row_lengths(inputs)
    pair_length = torch.maximum(lengths[:pairs], lengths[pairs:])
    out = []
    for group in _groups(pair_length, math.ceil(rows * width / max_tokens)):
        keep = torch.cat([group, group + pairs])
        trim = int(pair_length[group].max()) if right_padded else width
        out.append((_select(inputs, keep, trim, per_pair=group), len(group) / pairs))
    return out


def split_row_batch(inputs: dict, max_tokens: int | None) -> list[dict]:
    """A batch of rows (SFT) as passes of at most `max_tokens` padded tokens each where it can be split (a
    single row stays whole); the batch itself when it fits."""
    rows, width = inputs["input_ids"].shape
    if not max_tokens or rows * width <= max_tokens or rows < 2:
        return [inputs]
    lengths, right_padded = _row_lengths(inputs)
    return [_select(inputs, group, int(lengths[group].max()) if right_padded else width)
            for group in _groups(lengths, math.ceil(rows * width / max_tokens))]


def _row_lengths(inputs: dict) -> tuple[torch.Tensor, bool]:
    """Each row's token count, and whether every row is right-padded (so a pass can drop trailing padding)."""
    mask = inputs["attention_mask"]
    lengths = mask.sum(dim=1)
    return lengths, bool(all(mask[r, :int(n)].all() for r, n in enumerate(lengths)))


def _groups(lengths: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Indices split into `count` (at most one per index) groups of similar length, each in batch order."""
    order = torch.argsort(lengths, descending=True, stable=True)
    return [group.sort().values for group in torch.tensor_split(order, min(len(lengths), count))]


def _select(inputs: dict, keep: torch.Tensor, trim: int, per_pair: torch.Tensor | None = None) -> dict:
    """The rows `keep` of every per-row tensor, cut to `trim` positions; per-pair tensors take `per_pair`."""
    rows, width = inputs["input_ids"].shape
    pairs = rows // 2
    chunk = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == rows:
            value = value[keep]
            if value.dim() >= 2 and value.shape[1] == width:
                value = value[:, :trim]
        elif per_pair is not None and torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == pairs:
            value = value[per_pair]
        chunk[key] = value
    return chunk
