"""KTO's loss, reference point, label accuracy and weight advice (`align.objectives.unpaired`) against
hand-computed values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from align.objectives.unpaired import (
    UNPAIRED_LOSSES,
    FeedbackLogps,
    label_accuracy,
    reference_point,
    unpaired_loss,
    weight_advice,
)

SETTINGS = SimpleNamespace(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
# r = policy - reference = [1, 0, -1]; rows desirable, undesirable, desirable
ROWS = FeedbackLogps(policy=torch.tensor([-4.0, -9.0, -6.0]), reference=torch.tensor([-5.0, -9.0, -5.0]),
                     desirable=torch.tensor([True, False, True]))


def test_kto_loss_by_hand():
    """desirable: w_d (1 - sigmoid(beta (r - z0))); undesirable: w_u (1 - sigmoid(beta (z0 - r))); the mean over
    rows, weights not normalized away. With beta 0.5, z0 0.2: 1 - sigmoid(0.4) = 0.401312, 1 - sigmoid(0.1) =
    0.475021 (weight 2), 1 - sigmoid(-0.6) = 0.645656; mean (0.401312 + 0.950042 + 0.645656) / 3 = 0.665670."""
    loss, rewards = unpaired_loss("kto")(ROWS, torch.tensor(0.2), SETTINGS)
    assert float(loss) == pytest.approx(0.6656701, abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, 0.0, -0.5])  # beta * r
    per_row = UNPAIRED_LOSSES["kto"].compute(ROWS, torch.tensor(0.2), SETTINGS)
    assert per_row.tolist() == pytest.approx([0.4013123, 0.4750208, 0.6456563], abs=1e-6)


def test_kto_pushes_desirable_up_and_undesirable_down_and_no_gradient_reaches_z0():
    policy = ROWS.policy.clone().requires_grad_(True)
    z0 = torch.tensor(0.2, requires_grad=True)
    loss, _ = unpaired_loss("kto")(FeedbackLogps(policy, ROWS.reference, ROWS.desirable), z0, SETTINGS)
    loss.backward()
    assert policy.grad[0] < 0 and policy.grad[2] < 0 and policy.grad[1] > 0  # descent raises 0 and 2, lowers 1
    assert z0.grad is None  # the reference point is detached


def test_reference_point_is_the_clamped_mean_log_ratio_pooled_over_processes():
    policy, reference = torch.tensor([-3.0, -2.0, -7.0]), torch.tensor([-4.0, -2.5, -7.0])
    assert float(reference_point(policy, reference)) == pytest.approx((1 + 0.5 + 0) / 3)
    assert float(reference_point(reference, policy)) == 0.0  # a negative estimate is clamped at 0
    other = iter([torch.tensor(4.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)])
    pooled = reference_point(policy, reference, reduce=lambda t: t + next(other))  # another process: sum 4.5, 1 row
    assert float(pooled) == pytest.approx((1.5 + 4.5) / 4)
    assert not reference_point(policy.requires_grad_(True), reference).requires_grad


def test_label_accuracy_counts_rows_on_their_labels_side_of_z0_ties_half():
    r = torch.tensor([1.0, 0.0, -1.0, 0.2])
    desirable = torch.tensor([True, True, False, False])
    assert label_accuracy(r, desirable, 0.2) == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert label_accuracy(torch.zeros(4), desirable, 0.0) == 0.5  # the untrained policy: every row a tie


@pytest.mark.parametrize("counts, weights, fix", [
    ((100, 100), (1.0, 1.0), None),
    ((100, 80), (1.0, 1.0), None),  # 1.25: inside [1, 4/3]
    ((300, 100), (1.0, 1.0), "desirable_weight in [0.333, 0.444] or undesirable_weight in [2.25, 3]"),
    ((100, 300), (1.0, 1.0), "desirable_weight in [3, 4] or undesirable_weight in [0.25, 0.333]"),
    ((300, 100), (0.35, 1.0), None),  # the advised weight: 0.35 * 300 / 100 = 1.05
])
def test_weight_advice_names_the_weights_that_balance_the_rows(counts, weights, fix):
    advice = weight_advice(*counts, *weights)
    if fix is None:
        assert advice is None
    else:
        assert fix in advice and "outside the KTO paper's [1, 4/3]" in advice


def test_weight_advice_says_when_one_kind_of_row_is_missing():
    assert "all desirable" in weight_advice(10, 0, 1.0, 1.0)
    assert "all undesirable" in weight_advice(0, 10, 1.0, 1.0)
