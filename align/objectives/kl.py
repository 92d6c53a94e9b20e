"""The KL penalty against the reference: which estimator computes it, where it goes, and its coefficient.

Three separate choices, each explicit (`KLPenalty`):
- the estimator (`KL_ESTIMATORS`): Schulman's k1/k2/k3 of the sampled tokens, functions of log r with
  r = pi / ref: k1 = log r (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = (1/r - 1) + log r
  (unbiased, never negative);
- the placement: `reward` subtracts coef * KL from each token's reward (InstructGPT, k1), `loss` adds
  coef * the mean KL to the loss (GRPO, k3); `PLACEMENT_ESTIMATOR` is the estimator each placement uses;
- the coefficient's controller (`KL_CONTROLLERS`): fixed, or adaptive (Ziegler et al., 2019).
Whatever the placement, the KL figures and the adaptive controller read k1 (`FIGURE_ESTIMATOR`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from align.objectives.registry import Registry

Estimator = Callable[[torch.Tensor], torch.Tensor]  # log r per token -> the KL estimate per token

KL_ESTIMATORS: Registry[Estimator] = Registry("KL estimator")


def register_kl_estimator(name: str):
    """Decorator: register `estimate(log_ratio) -> per-token KL` as the KL estimator `name`."""
    return KL_ESTIMATORS.register(name)


@register_kl_estimator("k1")
def k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


@register_kl_estimator("k2")
def k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio ** 2


@register_kl_estimator("k3")
def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.expm1(-log_ratio) + log_ratio


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimates from the log-probs of the sampled tokens."""
    return KL_ESTIMATORS[estimator](logps.float() - ref_logps.float())


PLACEMENT_ESTIMATOR = {"reward": "k1", "loss": "k3"}  # each placement's estimator (recipes have no key for it)
FIGURE_ESTIMATOR = "k1"  # what the KL figures report and the adaptive controller steers by


# ------------------------------------------------------------------------------------------ controllers


class FixedKL:
    """A constant coefficient. Its state has the adaptive controller's form (target None), as checkpoints
    have always stored it."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.horizon = coef, horizon  # no target: nothing moves the coefficient

    def update(self, observed_kl: float, samples: int) -> float:
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": None, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.horizon = state["coef"], state["horizon"]


class AdaptiveKL:
    """The controller of Ziegler et al. (2019): move the coefficient toward the value that keeps the observed
    KL near `target`, by at most 20% of the error per `horizon` samples."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, observed_kl: float, samples: int) -> float:
        error = max(-0.2, min(0.2, observed_kl / self.target - 1.0))
        self.coef *= 1.0 + error * samples / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.target, self.horizon = state["coef"], state["target"], state["horizon"]


Controller = FixedKL | AdaptiveKL
KL_CONTROLLERS: Registry[Callable[[float, float, int], Controller]] = Registry("KL controller")
KL_CONTROLLERS.add("fixed", FixedKL)
KL_CONTROLLERS.add("adaptive", AdaptiveKL)


# ------------------------------------------------------------------------------------------ the penalty


@dataclass(frozen=True)
class KLPenalty:
    """The KL penalty as the trainer applies it."""

    coef: float          # the starting coefficient
    placement: str       # "reward" (per token, into the reward) or "loss" (the mean, into the loss)
    estimator: str       # the KL estimator that computes the penalty
    controller: str      # "fixed" or "adaptive"
    target: float        # the adaptive controller's per-token KL target
    horizon: int         # and the samples over which it moves by at most 20%

    def __post_init__(self):
        if self.placement not in PLACEMENT_ESTIMATOR:
            raise ValueError(f"unknown KL placement {self.placement!r}; expected one of "
                             f"{', '.join(PLACEMENT_ESTIMATOR)}")
        KL_ESTIMATORS[self.estimator], KL_CONTROLLERS[self.controller]  # unknown names fail here, not mid-run

    @classmethod
    def from_recipe(cls, kl) -> "KLPenalty":
        """From a recipe's `kl:` block (`align.config.recipe.KLSettings`): the estimator its placement uses."""
        return cls(coef=kl.coef, placement=kl.penalty, estimator=PLACEMENT_ESTIMATOR[kl.penalty],
                   controller="adaptive" if kl.adaptive else "fixed", target=kl.target, horizon=kl.horizon)

    @property
    def in_reward(self) -> bool:
        return self.placement == "reward"

    @property
    def in_loss(self) -> bool:
        return self.placement == "loss"

    def new_controller(self) -> Controller:
        return KL_CONTROLLERS[self.controller](self.coef, self.target, self.horizon)
