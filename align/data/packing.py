"""SFT packing: a batch's conversations laid out several to a row, none attending to another.

Why: a padded batch computes its padding like real tokens (on a CPU, wasted time), and cutting the padding
by grouping rows of similar length makes every batch hold conversations of one length. Packed, a batch
holds whole conversations end to end in a few rows, in any order, with little padding.

How samples stay apart: each conversation's position ids restart at 0 and no attention mask is passed, so
transformers builds its packed-sequence mask from the position ids (`masking_utils.find_packed_sequence_
indices`: block-diagonal and causal) for the sdpa and eager kernels; flash-attention kernels read the same
boundaries from the position ids as varlen sequences, but only in a single row, so for them the rows are
joined into one (`model_inputs`). The first token of each conversation is not scored: it would be
predicted from the previous conversation's last token. `packing_problem` checks on the model itself that
its attention honours the boundaries before a packed run trains.

The optimizer step is unchanged: the same `batch_size` conversations per step, the same labelled tokens
and the same loss (summed NLL over the batch's labelled tokens), so a packed run follows the schedule,
resume and evaluation of an unpacked one; only the layout of the batch differs.
"""

from __future__ import annotations

import torch

from align.data.tokenize import IGNORE


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of `lengths` in rows holding at most `width` tokens, longest first (first-fit decreasing);
    a length over `width` gets a row of its own."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if lengths[index] <= room), None)
        if row is None:
            rows.append([index])
            free.append(width - lengths[index])
        else:
            rows[row].append(index)
            free[row] -= lengths[index]
    return rows


WIDTHS_TRIED = 64  # row widths tried per batch, from the longest conversation to max_length


def pack_layout(lengths: list[int], max_width: int) -> list[list[int]]:
    """The rows (lists of indices) that hold the conversations in the fewest padded tokens (rows x longest
    row), of up to `WIDTHS_TRIED` row widths from the longest conversation to `max_width`; of equal areas the
    narrowest (attention spans a row, so its cost grows with the width). Never more padded tokens than one
    conversation a row (the longest conversation's width is always tried)."""
    longest = max(lengths)
    top = max(longest, max_width)
    step = max(1, -(-(top - longest) // (WIDTHS_TRIED - 1)))
    best, best_area = None, None
    for width in sorted({*range(longest, top + 1, step), top}):
        rows = first_fit(lengths, width)
        area = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if best_area is None or area < best_area:
            best, best_area = rows, area
        if len(rows) == 1:
            break  # wider rows cannot hold it in fewer tokens
    return best


class PackedCollator:
    """Batches of pre-tokenized `input_ids` + `labels` features, packed (`pack_layout`) into rows of at most
    `max_width` tokens: `input_ids`, `labels`, `position_ids` restarting per conversation, and `attention_mask`
    (1 on real tokens, 0 on a row's trailing padding) for the bookkeeping that counts tokens and splits
    passes; the model is called without it (`model_inputs`)."""

    def __init__(self, pad_token_id: int, max_width: int):
        self.pad_token_id, self.max_width = pad_token_id, max_width

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [(list(f["input_ids"]), list(f["labels"])) for f in features]
        rows = pack_layout([len(ids) for ids, _ in sequences], self.max_width)
        width = max(sum(len(sequences[i][0]) for i in row) for row in rows)
        out = {"input_ids": torch.full((len(rows), width), self.pad_token_id, dtype=torch.long),
               "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
               "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
               "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
        for r, row in enumerate(sorted(rows)):
            start = 0
            for index in sorted(row):  # batch order within a row
                ids, labels = sequences[index]
                stop = start + len(ids)
                out["input_ids"][r, start:stop] = torch.tensor(ids)
                out["labels"][r, start:stop] = torch.tensor([IGNORE] + labels[1:])
                out["position_ids"][r, start:stop] = torch.arange(len(ids))
                out["attention_mask"][r, start:stop] = 1
                start = stop
            # Padding continues as a sequence of its own: causal attention keeps real tokens from seeing it.
            out["position_ids"][r, start:] = torch.arange(width - start)
        return out


def is_packed(inputs: dict) -> bool:
    return "position_ids" in inputs


def uses_flash_attention(model) -> bool:
    return "flash" in str(getattr(model.config, "_attn_implementation", "") or "")


def model_inputs(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask, labels, position_ids) to call the model with: packed batches go without an
    attention mask (the boundaries are in the position ids), as one row for flash-attention kernels."""
    if not is_packed(inputs):
        return inputs["input_ids"], inputs["attention_mask"], inputs["labels"], None
    ids, labels, positions = inputs["input_ids"], inputs["labels"], inputs["position_ids"]
    if uses_flash_attention(model) and ids.size(0) > 1:
        ids, labels, positions = (t.reshape(1, -1) for t in (ids, labels, positions))
    return ids, None, labels, positions


def packing_problem(model, tolerance: float = 1e-2) -> str | None:
    """Why `model`'s attention would let packed conversations see each other, or None: two short sequences
    run packed in one row must give the hidden states each gives alone. One forward pass of 24 tokens, with
    no gradient, in eval mode."""
    from align.models.logprobs import causal_parts

    trunk, _ = causal_parts(model)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=generator).to(device) for n in (10, 14))
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None].to(device)
    if uses_flash_attention(model) and device.type != "cuda":
        return None  # flash kernels run on GPUs only; the run itself will say so
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = torch.cat([trunk(input_ids=x, use_cache=False).last_hidden_state for x in (first, second)], 1)
            packed = trunk(input_ids=torch.cat([first, second], 1), position_ids=positions,
                           use_cache=False).last_hidden_state
    finally:
        model.train(was_training)
    drift = float((packed.float() - alone.float()).norm() / alone.float().norm().clamp(min=1e-12))
    if drift > tolerance:
        kernel = getattr(model.config, "_attn_implementation", None)
        return (f"the model ({model.config.model_type}, attention {kernel}) lets packed conversations attend to "
                f"each other (hidden states differ by {drift:.2g} relative); use attention: sdpa or eager, or "
                "packing: false")
    return None
