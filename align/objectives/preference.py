"""The DPO family: preference losses on the log-probabilities of whole responses, one registered function each.

Why a registry: the recipe's `loss` names, the stage's reference handling (reference-free losses need no
reference pass), which log-probs a loss reads (summed, or per-token means) and which settings it uses were
spread over several if/elif chains. Each loss now says so where it is defined (`register_preference_loss`),
and the recipe schema, `align.stages.dpo` and the plan ask `PREFERENCE_LOSSES`.

With h = (pi_c - ref_c) - (pi_r - ref_r) (log-probs of chosen and rejected responses under the policy and
the reference):
  sigmoid (DPO)  -log sigmoid(beta h)                                           Rafailov et al., 2023
  ipo            (h - 1 / (2 beta))^2, on per-token mean log-probs              Azar et al., 2023
  hinge          max(0, 1 - beta h)                                             SLiC, Zhao et al., 2023
  cdpo           (1 - e) * -log sigmoid(beta h) + e * -log sigmoid(-beta h): labels flipped with prob. e
  simpo          -log sigmoid(beta (avg_c - avg_r) - gamma); no reference, length-normalized; Meng et al., 2024
  orpo           nll_c - lambda log sigmoid(log odds_c - log odds_r); no reference; Hong et al., 2024
The implicit reward of a response is beta * (pi - ref), or beta * pi (a per-token mean) without a reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from align.objectives.registry import Registry


@dataclass(frozen=True)
class PairLogps:
    """One batch of pairs' log-probs [B], summed over response tokens or per-token means (as the loss asks).
    `ref_*` are None for reference-free losses; `chosen_nll` is the chosen side's per-token NLL."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, logp: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None,
                   per_token: bool) -> "PairLogps":
        """From summed log-probs laid out [chosen; rejected] (2B), their response token counts, and the
        reference's summed log-probs in the same layout (None: no reference); per-token means if `per_token`."""
        chosen, rejected = logp.chunk(2)
        n_chosen, n_rejected = counts.clamp(min=1).chunk(2)
        nll = -(chosen / n_chosen)
        ref_chosen, ref_rejected = reference.chunk(2) if reference is not None else (None, None)
        if per_token:
            chosen, rejected = chosen / n_chosen, rejected / n_rejected
            if reference is not None:
                ref_chosen, ref_rejected = ref_chosen / n_chosen, ref_rejected / n_rejected
        return cls(chosen, rejected, ref_chosen, ref_rejected, nll)

    def margin(self) -> torch.Tensor:
        """h = (pi_c - ref_c) - (pi_r - ref_r)."""
        return ((self.chosen.float() - self.ref_chosen.float())
                - (self.rejected.float() - self.ref_rejected.float()))


Compute = Callable[[PairLogps, Any], torch.Tensor]  # (pairs, settings) -> the loss of each pair [B]


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered DPO-family loss. `settings` is the DPO stage's config: `beta` and the fields in `reads`."""

    name: str
    compute: Compute
    reference_free: bool = False  # needs no reference log-probs (the stage runs no reference pass)
    mean_logps: bool = False      # reads per-token mean log-probs (length-normalized), not sums
    reads: tuple[str, ...] = ()   # the stage settings it reads besides beta
    # Settings that must be > 0 with this loss, and why (shown when one is not).
    requires: dict[str, str] = field(default_factory=dict)

    def __call__(self, pairs: PairLogps, settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mean loss over the batch, and the implicit rewards of chosen and rejected responses [B]."""
        loss = self.compute(pairs, settings).mean()
        if self.reference_free:
            return loss, settings.beta * pairs.chosen.detach().float(), settings.beta * pairs.rejected.detach().float()
        chosen = settings.beta * (pairs.chosen.float() - pairs.ref_chosen.float())
        rejected = settings.beta * (pairs.rejected.float() - pairs.ref_rejected.float())
        return loss, chosen.detach(), rejected.detach()


PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("DPO loss")


def register_preference_loss(name: str, *, reference_free: bool = False, mean_logps: bool = False,
                             reads: tuple[str, ...] = (), requires: dict[str, str] | None = None):
    """Decorator: register `compute(pairs, settings) -> per-pair loss [B]` as the DPO loss `name`."""
    return PREFERENCE_LOSSES.register(name, lambda compute: PreferenceLoss(name, compute, reference_free, mean_logps,
                                                                          reads, dict(requires or {})))


def preference_loss(name: str) -> PreferenceLoss:
    """The registered loss `name` (ValueError naming the known ones otherwise)."""
    return PREFERENCE_LOSSES[name]


def smoothed_sigmoid_loss(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-log sigmoid(logits), with the label flipped with probability `smoothing` (conservative DPO)."""
    return -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)


# ------------------------------------------------------------------------------------------ the losses
# Registered in the order the recipe documentation lists them (errors list the names in this order).


@register_preference_loss("sigmoid")
def sigmoid(pairs: PairLogps, settings) -> torch.Tensor:
    return smoothed_sigmoid_loss(settings.beta * pairs.margin(), 0.0)


@register_preference_loss("ipo", mean_logps=True)
def ipo(pairs: PairLogps, settings) -> torch.Tensor:
    """On per-token means, so beta does not depend on response length."""
    return (pairs.margin() - 1 / (2 * settings.beta)) ** 2


@register_preference_loss("hinge")
def hinge(pairs: PairLogps, settings) -> torch.Tensor:
    return torch.relu(1 - settings.beta * pairs.margin())


@register_preference_loss("cdpo", reads=("label_smoothing",),
                          requires={"label_smoothing": "the assumed share of flipped labels"})
def cdpo(pairs: PairLogps, settings) -> torch.Tensor:
    return smoothed_sigmoid_loss(settings.beta * pairs.margin(), settings.label_smoothing)


@register_preference_loss("simpo", reference_free=True, mean_logps=True, reads=("label_smoothing", "simpo_gamma"))
def simpo(pairs: PairLogps, settings) -> torch.Tensor:
    logits = settings.beta * (pairs.chosen.float() - pairs.rejected.float()) - settings.simpo_gamma
    return smoothed_sigmoid_loss(logits, settings.label_smoothing)


@register_preference_loss("orpo", reference_free=True, mean_logps=True, reads=("orpo_lambda",))
def orpo(pairs: PairLogps, settings) -> torch.Tensor:
    """The chosen NLL plus lambda times the odds-ratio term; log odds(p) = log p - log(1 - p), with
    p = exp(mean log-prob)."""
    c, r = pairs.chosen.float(), pairs.rejected.float()
    log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    return pairs.chosen_nll.float() - settings.orpo_lambda * F.logsigmoid(log_odds)
