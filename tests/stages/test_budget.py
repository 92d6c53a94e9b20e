"""The end-to-end stage budget (`align.stages.budget`): training stops early enough for the stage's work after it
(the final evaluation, the held-out pass, saving and registering) to fit within `time_limit_minutes`."""

from __future__ import annotations

import pytest

from align.stages import budget as budget_module
from align.stages.budget import MARGIN_SECONDS, StageBudget


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(budget_module.time, "monotonic", c)
    return c


def test_time_before_training_counts_against_the_limit(clock):
    b = StageBudget(10)           # 600 s for the whole stage
    clock.now += 500              # loading and a reference pass
    assert not b.over()
    clock.now += 600 - 500 - MARGIN_SECONDS + 1
    assert b.over()               # training would have started already past its share


def test_the_final_evaluation_keeps_the_time_the_baseline_took(clock):
    b = StageBudget(10)
    b.reserve(120)                # the parent's baseline evaluation took 2 minutes; the final one will too
    clock.now += 600 - 120 - MARGIN_SECONDS - 1
    assert not b.over()
    clock.now += 2
    assert b.over()
    assert b.describe()["reserved_seconds"] == pytest.approx(120 + MARGIN_SECONDS)


def test_the_heldout_pass_is_sized_from_the_training_pace(clock):
    b = StageBudget(10, heldout_rows=80, rows_per_step=8)  # 10 steps' worth of rows, forward only
    b.step_started()
    for _ in range(5):
        clock.now += 4.0
        b.step_done()
    assert b.still_to_come() == pytest.approx(4.0 * budget_module.FORWARD_SHARE * 10 + MARGIN_SECONDS)


def test_no_limit_never_stops(clock):
    b = StageBudget(None)
    clock.now += 10 ** 6
    assert not b.over()


def test_trainer_callback_stops_training_with_the_rest_of_the_stage_in_view(clock):
    from transformers import TrainerControl, TrainerState

    from align.stages.callbacks import safety_callbacks

    b = StageBudget(1)
    b.reserve(30)                               # 60 s in all, 30 of them kept for the evaluation
    _, limit, *_ = safety_callbacks(b)
    state, control = TrainerState(), TrainerControl()
    limit.on_train_begin(None, state, control)
    clock.now += 5
    limit.on_step_end(None, state, control)
    assert not control.should_training_stop     # 5 + 30 + margin < 60
    clock.now += 10
    limit.on_step_end(None, state, control)
    assert control.should_training_stop and control.should_save and limit.reached
