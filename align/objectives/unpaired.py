"""Unpaired preference feedback (KTO): a loss on single responses, each labelled desirable or undesirable.

Why a registry (as `align.objectives.preference` has): the recipe's `loss` names what is registered here
(`UNPAIRED_LOSSES`), so a variant is one decorated function; the stage, the schema and the docs ask it.

With r = log pi(y|x) - log ref(y|x) (summed over the response's tokens) and z0 the reference point:
  kto   desirable: 1 - sigmoid(beta (r - z0)); undesirable: 1 - sigmoid(beta (z0 - r))
        Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7
Each row's loss is multiplied by `desirable_weight` or `undesirable_weight` and the batch's loss is the mean
over its rows, the weights not normalized away (as TRL's `KTOTrainer` does). The implicit reward of a row
is beta * r.

z0 is KTO's estimate of KL(pi || ref) (`reference_point`): the mean over the batch of
log pi(y'|x) - log ref(y'|x) on mismatched combinations (each prompt with another row's completion),
clamped at 0 and without gradient; pooled over every process's rows when given a reducer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from align.objectives.registry import Registry

# The paper's advice (eq. 8): desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]
BALANCED = (1.0, 4.0 / 3.0)


@dataclass(frozen=True)
class FeedbackLogps:
    """One batch of rows' summed response log-probs [B] under the policy and the reference, and their labels."""

    policy: torch.Tensor
    reference: torch.Tensor
    desirable: torch.Tensor  # bool [B]

    def log_ratio(self) -> torch.Tensor:
        """r = log pi - log ref of each row."""
        return self.policy.float() - self.reference.float()


Compute = Callable[[FeedbackLogps, torch.Tensor, Any], torch.Tensor]  # (rows, z0, settings) -> loss [B]


@dataclass(frozen=True)
class UnpairedLoss:
    """A registered unpaired loss. `settings` is the stage config: `beta`, `desirable_weight`,
    `undesirable_weight`."""

    name: str
    compute: Compute

    def __call__(self, rows: FeedbackLogps, z0: torch.Tensor, settings) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss (the weighted rows' mean) and each row's implicit reward beta * r [B] (detached)."""
        weights = torch.where(rows.desirable, settings.desirable_weight, settings.undesirable_weight)
        loss = (weights.to(rows.policy.device) * self.compute(rows, z0.detach(), settings)).mean()
        return loss, settings.beta * rows.log_ratio().detach()


UNPAIRED_LOSSES: Registry[UnpairedLoss] = Registry("unpaired loss")


def register_unpaired_loss(name: str):
    """Decorator: register `compute(rows, z0, settings) -> per-row loss [B]` (unweighted) as the loss `name`."""
    return UNPAIRED_LOSSES.register(name, lambda compute: UnpairedLoss(name, compute))


def unpaired_loss(name: str) -> UnpairedLoss:
    """The registered loss `name` (ValueError naming the known ones otherwise)."""
    return UNPAIRED_LOSSES[name]


@register_unpaired_loss("kto")
def kto(rows: FeedbackLogps, z0: torch.Tensor, settings) -> torch.Tensor:
    gain = settings.beta * (rows.log_ratio() - z0.float())
    return 1 - torch.sigmoid(torch.where(rows.desirable, gain, -gain))


# ------------------------------------------------------------------------------------------ the reference point


def reference_point(policy: torch.Tensor, reference: torch.Tensor, reduce=None) -> torch.Tensor:
    """z0 = max(0, mean(policy - reference)) over the batch's mismatched combinations, without gradient;
    `reduce` (`align.runtime.distributed.reducer()`) pools the sum and count over every process's rows."""
    diff = (policy.detach().double() - reference.detach().double().to(policy.device))
    total = diff.sum()
    count = torch.tensor(float(diff.numel()), dtype=torch.float64, device=diff.device)
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    return (total / count.clamp(min=1)).clamp(min=0).float()


def label_accuracy(log_ratio: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor | float) -> float:
    """Share of rows whose r lies on the side of z0 their label says (desirable above, undesirable below),
    a tie counting half: the rows KTO's loss already ranks right."""
    if log_ratio.numel() == 0:
        return float("nan")
    r = log_ratio.detach()
    z0 = torch.as_tensor(z0, dtype=r.dtype, device=r.device)  # in r's precision, so a tie is one
    right = torch.where(desirable.bool().to(r.device), r > z0, r < z0).double()
    return float((right + 0.5 * (r == z0).double()).mean())


def weight_advice(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """None when w_d * n_d / (w_u * n_u) is in the paper's [1, 4/3]; else what is off and which weights
    would fix it (either one, not both)."""
    if not desirable or not undesirable:
        return (f"the training rows are all {'undesirable' if undesirable else 'desirable'} ({desirable} "
                f"desirable, {undesirable} undesirable): KTO then only "
                f"{'lowers' if undesirable else 'raises'} rewards against the reference point")
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    low, high = BALANCED
    if low - 1e-9 <= ratio <= high + 1e-9:
        return None
    d_low = undesirable_weight * undesirable / desirable
    u_high = desirable_weight * desirable / undesirable
    return (f"{desirable} desirable and {undesirable} undesirable rows: desirable_weight x desirable / "
            f"(undesirable_weight x undesirable) = {ratio:.3g}, outside the KTO paper's [1, 4/3]; set "
            f"desirable_weight in [{d_low:.3g}, {d_low * high:.3g}] or undesirable_weight in "
            f"[{u_high / high:.3g}, {u_high:.3g}] (not both)")
