"""Masked statistics against hand-computed values, and their pooled form: given a reducer that sums over
processes, each gives what one process gets on all the rows (here a stand-in reducer for two processes)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from align.objectives.stats import explained_variance, masked_mean, masked_moments, masked_var, whiten


def test_whitening_and_explained_variance_by_hand():
    white = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert white.tolist()[0] == pytest.approx([-1.224745, 0.0, 1.224745, 0.0], abs=1e-5)
    returns, mask = torch.tensor([[1.0, 2.0, 4.0]]), torch.ones(1, 3)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 7 / 3), returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(returns, torch.ones(1, 3), mask))  # constant returns: undefined


def test_masked_mean_and_variance_by_hand():
    values, mask = torch.tensor([[1.0, 3.0, 50.0], [5.0, 7.0, 9.0]]), torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(values, mask).item() == 4.0
    assert masked_var(values, mask).item() == 5.0  # deviations -3, -1, 1, 3
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0  # nothing masked in: 0, not NaN
    assert whiten(values, mask, shift_mean=False).tolist()[0][:2] == pytest.approx(
        [(1 - 4) / 5 ** 0.5 + 4, (3 - 4) / 5 ** 0.5 + 4], abs=1e-5)


def test_one_process_is_the_plain_formula_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 9, generator=generator)
    mask = (torch.rand(6, 9, generator=generator) > 0.3).float()
    mean = (values * mask).sum() / mask.sum().clamp(min=1.0)
    var = (((values - mean) ** 2) * mask).sum() / mask.sum().clamp(min=1.0)
    assert torch.equal(masked_mean(values, mask), mean)
    assert torch.equal(masked_var(values, mask), var)
    assert torch.equal(whiten(values, mask), (values - mean) * torch.rsqrt(var + 1e-8) * mask)


def _as_two_processes(statistic, parts: list[tuple]) -> list:
    """`statistic` run on each part in its own thread, as two processes would: the reducer adds both
    threads' sums (what `align.runtime.distributed.all_sum` does between processes)."""
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def run(index: int) -> None:
        def reduce(sums):
            slots[index] = sums
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read the sums before either reduces again
            return total

        results[index] = statistic(*parts[index], reduce=reduce)

    threads = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_pooled_statistics_equal_the_plain_ones_on_all_rows():
    generator = torch.Generator().manual_seed(1)
    parts = [(torch.randn(rows, 5, generator=generator), (torch.rand(rows, 5, generator=generator) > 0.3).float())
             for rows in (3, 5)]
    values, mask = (torch.cat(t) for t in zip(*parts))
    for mean, var in _as_two_processes(masked_moments, parts):
        assert float(mean) == pytest.approx(float(masked_mean(values, mask)), rel=1e-6)
        assert float(var) == pytest.approx(float(masked_var(values, mask)), rel=1e-6)
    whitened = torch.cat(_as_two_processes(whiten, parts))
    torch.testing.assert_close(whitened, whiten(values, mask), rtol=1e-5, atol=1e-6)
    returns = [(torch.randn(len(v), 5, generator=generator), v, m) for v, m in parts]
    both = (torch.cat([r for r, _, _ in returns]), values, mask)
    for figure in _as_two_processes(lambda r, v, m, reduce: explained_variance(v, r, m, reduce=reduce), returns):
        assert figure == pytest.approx(explained_variance(both[1], both[0], both[2]), rel=1e-5)
