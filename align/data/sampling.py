"""Batch order and padding. For training: length-grouped, reproducible per epoch, so a resumed run sees the same batches.

Grouping by length cuts padding (on a CPU, padding is wasted compute). The order depends only on the seed
and the epoch number, never on the global RNG state, so a run resumed mid-epoch from a checkpoint replays
exactly the batches the uninterrupted run would have seen (the library sampler draws from the global RNG,
whose state at resume differs from the epoch start).
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

MEGABATCH = 50  # batches per sorted group: long enough to group lengths, short enough to stay shuffled


class LengthGroupedEpochSampler(Sampler[int]):
    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * MEGABATCH
        for start in range(0, len(order), size):
            group = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            yield from group


class EpochShuffleSampler(LengthGroupedEpochSampler):
    """A random order fixed by seed and epoch alone, not grouped by length (packed SFT batches, whose padding
    is small whatever their lengths): a resumed run replays the same batches, as with the grouped order."""

    def __init__(self, count: int, seed: int):
        super().__init__([0] * count, 1, seed)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.lengths), generator=generator).tolist()


def length_sorted_chunks(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in order of length, cut into batches: for inference passes, where order is free and padding
    is wasted compute. Callers put results back by index."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def pair_chunks(pairs, pairs_per_batch: int) -> list[list[int]]:
    """Indices of preference pairs (`EncodedPair`) in batches of similar length (the longer side of each pair;
    a missing second side counts as empty), for no-grad passes."""
    return length_sorted_chunks([max(len(p.chosen.input_ids), len(p.rejected.input_ids) if p.rejected else 0)
                                 for p in pairs], pairs_per_batch)


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [N, width] tensor of `sequences` and its attention mask; with `pad_id=-100` it pads
    label rows."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [N, width] tensor of `sequences` and its attention mask: prompts for generation, whose
    new tokens must follow every row's last real token."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask
