"""The DPO family against hand-computed values; each loss's properties drive the stage; and a new loss is
one registered function: the recipe accepts its name and the DPO stage's loss uses it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from align.errors import ConfigError
from align.config.loading import validate_recipe
from align.objectives.preference import PREFERENCE_LOSSES, PairLogps, preference_loss, register_preference_loss

# Two pairs. h = (pi_c - ref_c) - (pi_r - ref_r): pair 0: (-1 - -2) - (-3 - -2) = 2; pair 1: (-2 - -2) - (-2 - -1) = 1
PI_C, PI_R = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0])
REF_C, REF_R = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -1.0])
PAIRS = PairLogps(PI_C, PI_R, REF_C, REF_R)


def _nls(x: float) -> float:
    """-log sigmoid(x), by hand."""
    return math.log(1 + math.exp(-x))


def _settings(**values) -> SimpleNamespace:
    return SimpleNamespace(**{"beta": 0.5, "label_smoothing": 0.0, "simpo_gamma": 0.5, "orpo_lambda": 0.1, **values})


def test_dpo_sigmoid_loss_and_implicit_rewards():
    loss, chosen, rejected = preference_loss("sigmoid")(PAIRS, _settings())
    assert loss.item() == pytest.approx((_nls(1.0) + _nls(0.5)) / 2, abs=1e-6)  # beta * h = 1.0 and 0.5
    assert chosen.tolist() == pytest.approx([0.5, 0.0])
    assert rejected.tolist() == pytest.approx([-0.5, -0.5])


def test_conservative_dpo_flips_labels_with_the_smoothing_probability():
    loss, _, _ = preference_loss("cdpo")(PAIRS, _settings(label_smoothing=0.1))
    expected = [0.9 * _nls(x) + 0.1 * _nls(-x) for x in (1.0, 0.5)]
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)


def test_ipo_and_hinge():
    ipo, _, _ = preference_loss("ipo")(PAIRS, _settings())
    assert ipo.item() == pytest.approx(((2 - 1) ** 2 + (1 - 1) ** 2) / 2)  # target h = 1 / (2 beta) = 1
    hinge, _, _ = preference_loss("hinge")(PAIRS, _settings())
    assert hinge.item() == pytest.approx((0.0 + 0.5) / 2)  # max(0, 1 - 1.0), max(0, 1 - 0.5)


def test_dpo_starts_at_log2_with_zero_rewards_when_policy_equals_reference():
    loss, chosen, rejected = preference_loss("sigmoid")(PairLogps(REF_C, REF_R, REF_C, REF_R), _settings(beta=0.1))
    assert loss.item() == pytest.approx(math.log(2))
    assert chosen.abs().max().item() == 0 and rejected.abs().max().item() == 0


def test_simpo_is_reference_free_and_length_normalized():
    loss, chosen, _ = preference_loss("simpo")(PairLogps(torch.tensor([-0.5]), torch.tensor([-1.5])),
                                               _settings(beta=2.0, simpo_gamma=0.5))
    assert loss.item() == pytest.approx(_nls(2.0 * 1.0 - 0.5), abs=1e-6)
    assert chosen.tolist() == pytest.approx([-1.0])  # the reward without a reference: beta * mean log-prob


def test_orpo_odds_ratio_by_hand():
    c, r = math.log(0.5), math.log(0.25)  # odds 1 and 1/3: log odds ratio = log 3
    pairs = PairLogps(torch.tensor([c]), torch.tensor([r]), chosen_nll=torch.tensor([0.7]))
    loss, _, _ = preference_loss("orpo")(pairs, _settings(orpo_lambda=0.1))
    assert loss.item() == pytest.approx(0.7 + 0.1 * _nls(math.log(3)), abs=1e-6)


def test_unknown_dpo_loss_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'; expected one of 'sigmoid', 'ipo', 'hinge', "
                                         "'cdpo', 'simpo' or 'orpo'"):
        preference_loss("kto")


def test_each_loss_says_what_it_needs():
    needs = {name: (loss.reference_free, loss.mean_logps, loss.reads) for name, loss in PREFERENCE_LOSSES.items()}
    assert needs == {"sigmoid": (False, False, ()), "ipo": (False, True, ()), "hinge": (False, False, ()),
                     "cdpo": (False, False, ("label_smoothing",)),
                     "simpo": (True, True, ("label_smoothing", "simpo_gamma")),
                     "orpo": (True, True, ("orpo_lambda",))}
    assert preference_loss("cdpo").requires == {"label_smoothing": "the assumed share of flipped labels"}


def test_a_batch_becomes_sums_or_per_token_means():
    logp = torch.tensor([-4.0, -9.0, -6.0, -5.0])  # chosen 0, chosen 1, rejected 0, rejected 1 (sums)
    counts = torch.tensor([2, 3, 2, 0])  # an empty response counts as one token
    reference = torch.tensor([-2.0, -3.0, -4.0, -1.0])
    sums = PairLogps.from_batch(logp, counts, reference, per_token=False)
    assert sums.chosen.tolist() == [-4.0, -9.0] and sums.ref_rejected.tolist() == [-4.0, -1.0]
    means = PairLogps.from_batch(logp, counts, reference, per_token=True)
    assert means.chosen.tolist() == [-2.0, -3.0] and means.rejected.tolist() == [-3.0, -5.0]
    assert means.ref_chosen.tolist() == [-1.0, -1.0] and means.ref_rejected.tolist() == [-2.0, -1.0]
    assert means.chosen_nll.tolist() == sums.chosen_nll.tolist() == [2.0, 3.0]
    assert PairLogps.from_batch(logp, counts, None, per_token=True).ref_chosen is None


# ------------------------------------------------------------------------------------------ a new loss


def _dpo_recipe(**stage):
    raw = {"name": "t", "base": "tiny/base", "stages": {"dpo": {"data": "pairs.jsonl", **stage}}}
    return validate_recipe(raw, []).stages["dpo"]


@pytest.fixture
def squared_hinge():
    """A loss the package does not have, registered for the test only."""

    @register_preference_loss("squared_hinge")
    def squared_hinge(pairs, settings):
        return torch.relu(1 - settings.beta * pairs.margin()) ** 2

    yield "squared_hinge"
    PREFERENCE_LOSSES.remove("squared_hinge")


@pytest.fixture
def mean_margin():
    """A reference-free loss on per-token means, registered for the test only."""

    @register_preference_loss("mean_margin", reference_free=True, mean_logps=True)
    def mean_margin(pairs, settings):
        return -torch.nn.functional.logsigmoid(settings.beta * (pairs.chosen - pairs.rejected))

    yield "mean_margin"
    PREFERENCE_LOSSES.remove("mean_margin")


def test_a_new_loss_is_accepted_by_the_recipe_and_used_by_the_dpo_stage(squared_hinge):
    from align.stages.dpo import preference_loss as stage_loss, reference_mode

    cfg = _dpo_recipe(loss=squared_hinge, beta=0.5)
    assert cfg.loss == "squared_hinge" and reference_mode(cfg) == "precomputed"
    logp = torch.cat([PI_C, PI_R])  # the stage's layout: chosen rows, then rejected rows (sums)
    loss, chosen, _ = stage_loss(cfg, logp, torch.ones(4), torch.cat([REF_C, REF_R]))
    assert loss.item() == pytest.approx(((1 - 1.0) ** 2 + (1 - 0.5) ** 2) / 2)  # beta * h = 1.0 and 0.5
    assert chosen.tolist() == pytest.approx([0.5, 0.0])


def test_a_new_reference_free_loss_needs_no_reference_and_reads_means(mean_margin):
    from align.stages.dpo import preference_loss as stage_loss, reference_mode

    cfg = _dpo_recipe(loss=mean_margin, beta=1.0)
    assert reference_mode(cfg) is None  # no reference pass
    logp, counts = torch.tensor([-2.0, -6.0]), torch.tensor([1, 2])  # per-token means -2 and -3
    loss, chosen, rejected = stage_loss(cfg, logp, counts, torch.full((2,), math.nan))  # no reference: NaN
    assert loss.item() == pytest.approx(_nls(1.0), abs=1e-6)
    assert (chosen.item(), rejected.item()) == (-2.0, -3.0)
    with pytest.raises(ConfigError, match="loss mean_margin is reference-free; remove reference: copy"):
        _dpo_recipe(loss=mean_margin, reference="copy")


def test_an_unregistered_loss_is_refused_at_its_yaml_path_with_the_known_names():
    with pytest.raises(ConfigError) as err:
        _dpo_recipe(loss="squared_hinge")
    assert [str(p) for p in err.value.problems] == [
        "stages.dpo.loss: expected one of 'sigmoid', 'ipo', 'hinge', 'cdpo', 'simpo' or 'orpo', "
        'got "squared_hinge"']
