"""KL estimators, coefficient controllers and the penalty's placement, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from align.objectives.kl import (KL_CONTROLLERS, KL_ESTIMATORS, AdaptiveKL, FixedKL, KLPenalty, kl_per_token,
                                 register_kl_estimator)


def test_kl_estimators_by_hand():
    logps, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_per_token(logps, ref, "k1").item() == pytest.approx(1.0)
    assert kl_per_token(logps, ref, "k2").item() == pytest.approx(0.5)
    assert kl_per_token(logps, ref, "k3").item() == pytest.approx(math.exp(-1) - 1 + 1, abs=1e-6)
    assert kl_per_token(ref, ref, "k3").item() == 0.0


def test_an_unknown_estimator_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; expected one of 'k1', 'k2' or 'k3'"):
        kl_per_token(torch.zeros(1), torch.zeros(1), "k4")


def test_controllers_fixed_and_adaptive():
    controller = AdaptiveKL(coef=0.1, target=0.1, horizon=100)
    assert controller.update(observed_kl=0.5, samples=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    assert FixedKL(coef=0.1, target=0.1, horizon=100).update(5.0, 10) == 0.1  # fixed coefficient
    assert KL_CONTROLLERS.names() == ["fixed", "adaptive"]


def test_controller_state_keeps_the_checkpoint_form():
    """Checkpoints store {coef, target, horizon}, target None for a fixed coefficient (as they always have)."""
    fixed = FixedKL(0.05, 0.1, 1000)
    assert fixed.state_dict() == {"coef": 0.05, "target": None, "horizon": 1000}
    adaptive = AdaptiveKL(0.05, 0.1, 1000)
    adaptive.load_state_dict({"coef": 0.2, "target": 0.3, "horizon": 50})
    assert adaptive.state_dict() == {"coef": 0.2, "target": 0.3, "horizon": 50}


def test_the_placement_is_a_choice_apart_from_the_estimator():
    from align.config.schema import KLSettings

    in_reward = KLPenalty.from_recipe(KLSettings(coef=0.05, adaptive=True, target=0.2, horizon=500))
    assert (in_reward.placement, in_reward.estimator, in_reward.controller) == ("reward", "k1", "adaptive")
    assert in_reward.in_reward and not in_reward.in_loss
    in_loss = KLPenalty.from_recipe(KLSettings(coef=0.01, penalty="loss"))
    assert (in_loss.placement, in_loss.estimator, in_loss.controller) == ("loss", "k3", "fixed")
    other = KLPenalty(coef=0.01, placement="loss", estimator="k2", controller="fixed", target=0.1, horizon=10)
    assert other.in_loss and other.estimator == "k2"
    assert isinstance(in_reward.new_controller(), AdaptiveKL) and isinstance(in_loss.new_controller(), FixedKL)


def test_a_penalty_with_unknown_names_is_refused_when_built():
    with pytest.raises(ValueError, match="unknown KL placement 'prompt'"):
        KLPenalty(coef=0.1, placement="prompt", estimator="k1", controller="fixed", target=0.1, horizon=10)
    with pytest.raises(ValueError, match="unknown KL controller 'pid'"):
        KLPenalty(coef=0.1, placement="loss", estimator="k1", controller="pid", target=0.1, horizon=10)


def test_a_new_estimator_is_one_registered_function():
    @register_kl_estimator("squared_ratio")
    def squared_ratio(log_ratio):
        return torch.expm1(log_ratio) ** 2

    try:
        assert kl_per_token(torch.tensor([math.log(3.0)]), torch.zeros(1), "squared_ratio").item() == \
            pytest.approx(4.0)
        with pytest.raises(ValueError, match="already registered"):
            register_kl_estimator("squared_ratio")(squared_ratio)
    finally:
        KL_ESTIMATORS.remove("squared_ratio")
    assert "squared_ratio" not in KL_ESTIMATORS
