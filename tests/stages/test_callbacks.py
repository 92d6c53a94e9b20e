"""The Trainer stages' callbacks (`align.stages.callbacks`): the console lines they write."""

from __future__ import annotations

from types import SimpleNamespace

from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, ProgressCallback

from align.stages.callbacks import console_step_lines


def test_the_console_bar_writes_align_step_lines_not_raw_dicts(capsys, tmp_path):
    """transformers' progress callback writes each log above its bar as a Python dict; ours writes the same
    step line as the run's log file, and keeps the bar."""
    handler = CallbackHandler([ProgressCallback()], None, None, None, None)
    console_step_lines(SimpleNamespace(callback_handler=handler))
    bars = [c for c in handler.callbacks if isinstance(c, ProgressCallback)]
    assert len(bars) == 1 and type(bars[0]) is not ProgressCallback
    args, state, control = TrainingArguments(output_dir=str(tmp_path), report_to="none"), TrainerState(), TrainerControl()
    state.max_steps, state.global_step = 10, 3
    handler.on_train_begin(args, state, control)
    handler.on_log(args, state, control, logs={"loss": 1.25, "grad_norm": 3.6, "total_flos": 1e9})
    handler.on_train_end(args, state, control)
    shown = "".join(capsys.readouterr())
    assert "step 3/10: loss 1.25, grad_norm 3.6" in shown
    assert "{'loss'" not in shown and "total_flos" not in shown
