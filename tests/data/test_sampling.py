"""The length-grouped sampler: an order fixed by seed and epoch alone (what makes resume exact), every
index once per epoch, lengths grouped."""

from __future__ import annotations

import torch

from align.data.sampling import LengthGroupedEpochSampler

LENGTHS = [(i * 37) % 101 for i in range(400)]


def _order(seed: int, epoch: int) -> list[int]:
    sampler = LengthGroupedEpochSampler(LENGTHS, batch_size=4, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_order_depends_only_on_seed_and_epoch():
    first = _order(0, 1)
    torch.manual_seed(123)  # the global RNG (restored to another state on resume) must not matter
    assert _order(0, 1) == first
    assert _order(0, 2) != first and _order(1, 1) != first


def test_every_index_once_and_lengths_grouped():
    order = _order(0, 0)
    assert sorted(order) == list(range(len(LENGTHS)))
    group = [LENGTHS[i] for i in order[:200]]  # one megabatch of 50 batches of 4
    assert group == sorted(group, reverse=True)
    # grouping pays: padding within batches is far below a random order's
    def padding(o):
        return sum(max(LENGTHS[i] for i in o[k:k + 4]) * 4 - sum(LENGTHS[i] for i in o[k:k + 4])
                   for k in range(0, len(o), 4))
    assert padding(order) < 0.2 * padding(torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist())


def test_length_sorted_chunks_cover_every_index_once_in_length_order():
    from align.data.sampling import length_sorted_chunks

    lengths = [5, 1, 9, 3, 7, 2, 8]
    chunks = length_sorted_chunks(lengths, 3)
    assert [len(c) for c in chunks] == [3, 3, 1]
    flat = [i for c in chunks for i in c]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)


def test_pad_right_pads_ids_and_labels():
    from align.data.sampling import pad_right

    ids, mask = pad_right([[4, 5, 6], [7]], 0)
    assert ids.tolist() == [[4, 5, 6], [7, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    labels, _ = pad_right([[-100, 5], [-100, -100, 9]], -100)
    assert labels.tolist() == [[-100, 5, -100], [-100, -100, 9]]


def test_pad_left_puts_every_row_against_the_right_edge():
    from align.data.sampling import pad_left

    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
