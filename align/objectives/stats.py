"""Masked statistics over response tokens, on one process's rows or pooled over every process's.

Why one set: the PPO loop whitens advantages and reports explained variance over all processes' rows, and
a second, distributed copy of these formulas had drifted from the first. Here each statistic is written
once, around one point where the sums may be pooled: pass `reduce` (a function summing a tensor over
processes, `align.runtime.distributed.reducer()`), and the result is what one process would compute on
every process's rows concatenated. Without it (one process) nothing is converted or reduced, so the result
is bit for bit the plain formula. Pooled sums travel in float64; a pooled result carries no gradient.

Tensors are [B, T] with `mask` [B, T] (1 = a real response token).
"""

from __future__ import annotations

from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # a tensor summed element-wise over processes


def _pooled(sums: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
    return sums if reduce is None else reduce(sums.double())


def masked_mean(values: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is set (0 when nothing is)."""
    mask = mask.to(values.dtype)
    sums = _pooled(torch.stack([(values * mask).sum(), mask.sum()]), reduce)
    return (sums[0] / sums[1].clamp(min=1.0)).to(values.dtype)


def masked_moments(values: torch.Tensor, mask: torch.Tensor,
                   reduce: Reduce | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of `values` where `mask` is set."""
    mean = masked_mean(values, mask, reduce)
    return mean, masked_mean((values - mean) ** 2, mask, reduce)


def masked_var(values: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
    return masked_moments(values, mask, reduce)[1]


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           reduce: Reduce | None = None) -> torch.Tensor:
    """Scale masked values to unit variance (and zero mean unless `shift_mean` is False); padding stays 0."""
    mean, var = masked_moments(values, mask, reduce)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       reduce: Reduce | None = None) -> float:
    """1 - Var(R - V) / Var(R) over response tokens: 1 is a perfect critic, 0 no better than a constant
    (NaN when the returns do not vary)."""
    var_returns = masked_var(returns.float(), mask, reduce)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns.float() - values.float(), mask, reduce) / var_returns)
