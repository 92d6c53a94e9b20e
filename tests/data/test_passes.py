"""Splitting a pair batch into passes: every pair once, both of its rows together, per-pair values with
their pair, each pass trimmed to its own longest row, weights adding up to one."""

import torch

from align.data.passes import split_pair_batch
from align.data.sampling import pad_right


def _batch(lengths: list[int]) -> dict:
    """Pairs whose chosen row i holds tokens 100*i + t and rejected row 1000 + 100*i + t."""
    pairs = len(lengths)
    rows = [[100 * i + t for t in range(n)] for i, n in enumerate(lengths)]
    rows += [[1000 + 100 * i + t for t in range(n - 1)] for i, n in enumerate(lengths)]
    ids, mask = pad_right(rows, 0)
    return {"input_ids": ids, "attention_mask": mask, "margin": torch.arange(pairs, dtype=torch.float32),
            "starts": torch.zeros(2 * pairs, dtype=torch.long)}


def test_a_batch_within_the_budget_stays_whole():
    batch = _batch([5, 3, 4, 2])
    assert split_pair_batch(batch, 8 * 5) == [(batch, 1.0)]
    assert split_pair_batch(batch, None) == [(batch, 1.0)]


def test_a_big_batch_splits_into_pair_preserving_trimmed_passes():
    lengths = [3, 9, 2, 8, 4, 7]
    batch = _batch(lengths)
    passes = split_pair_batch(batch, 12 * 9 // 2)  # half the padded size: two passes
    assert len(passes) == 2
    assert sum(weight for _, weight in passes) == 1.0
    seen = []
    for chunk, weight in passes:
        ids, mask = chunk["input_ids"], chunk["attention_mask"]
        pairs = len(chunk["margin"])
        assert weight == pairs / 6 and ids.shape[0] == 2 * pairs
        for j in range(pairs):
            pair = int(chunk["margin"][j])
            seen.append(pair)
            assert int(ids[j, 0]) == 100 * pair and int(ids[pairs + j, 0]) == 1000 + 100 * pair
            assert int(mask[j].sum()) == lengths[pair]
        assert ids.shape[1] == max(lengths[int(p)] for p in chunk["margin"])  # its own padding only
    assert sorted(seen) == list(range(6))
    longest = [int(p) for p in passes[0][0]["margin"]] + [int(p) for p in passes[1][0]["margin"]]
    assert {longest[0], longest[1], longest[2]} == {1, 3, 5}  # the long pairs travel together


def test_an_sft_batch_splits_into_trimmed_passes_of_whole_rows():
    from align.data.passes import split_row_batch

    lengths = [3, 9, 2, 8, 4]
    ids, mask = pad_right([[10 * i + t for t in range(n)] for i, n in enumerate(lengths)], 0)
    labels, _ = pad_right([[10 * i + t for t in range(n)] for i, n in enumerate(lengths)], -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert split_row_batch(batch, 5 * 9) == [batch]
    passes = split_row_batch(batch, 5 * 9 // 2 + 1)  # just over half the padded size: two passes
    assert len(passes) == 2
    seen = sorted(int(chunk["input_ids"][r, 0]) // 10 for chunk in passes for r in range(len(chunk["input_ids"])))
    assert seen == list(range(5))
    for chunk in passes:
        firsts = [int(row[0]) // 10 for row in chunk["input_ids"]]
        assert chunk["input_ids"].shape[1] == max(lengths[i] for i in firsts)
        assert torch.equal(chunk["labels"] != -100, chunk["attention_mask"].bool())
    assert {int(row[0]) // 10 for row in passes[0]["input_ids"]} == {1, 3, 4}  # the long rows travel together
