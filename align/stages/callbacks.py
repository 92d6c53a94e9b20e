"""What makes a run safe to interrupt: a graceful stop on SIGTERM/SIGINT, the time limit, a non-finite loss stop;
and what every Trainer stage logs to its tracker (`metrics.jsonl`, and the trackers `report` names).
"""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path

from align.errors import TrainingError
from align.runtime.distributed import all_max
from align.stages.budget import StageBudget
from align.stages.run_folder import record_world_size
from align.stages.tracker import Tracker

log = logging.getLogger(__name__)


class StopRequest:
    """While entered, SIGTERM/SIGINT only set `requested`: the training loop finishes its step, saves a
    checkpoint and stops. Shared by the `Trainer` callback below and the PPO loop."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("signal %s received: saving a checkpoint after this step", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def safety_callbacks(time_limit: StageBudget | float | None = None, tracker: Tracker | None = None):
    """Callbacks for HF/TRL trainers: [graceful stop, time limit, ...], then those that log to `tracker` (the
    stage's `ctx.tracker`; none given: nothing is logged beyond the trainer's history). The graceful stop's
    `requested` flag tells the caller the run was interrupted (SIGTERM/SIGINT: checkpoint saved, stop); the time limit's
    `reached` flag says training ended early at the recipe's `time_limit_minutes` (checkpoint saved, the
    stage then evaluates and registers what it has, and says so in the manifest)."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        """Stops training when the rest of the stage (final evaluation, save, register) would no longer fit
        in its end-to-end budget (`align.stages.budget`)."""

        def __init__(self, budget: StageBudget):
            self.budget = budget
            self.reached = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.budget.step_started()

        def on_step_end(self, args, state, control, **kwargs):
            self.budget.step_done()
            over = not self.reached and self.budget.over()
            if all_max(int(over)):  # decided together: a process stopping alone would leave the others waiting
                self.reached = True
                log.warning("time limit of %.1f minutes for the whole stage: stopping training at step %d after "
                            "%.0f s, keeping %.0f s for the evaluation and the entry", self.budget.minutes,
                            state.global_step, self.budget.elapsed(), self.budget.still_to_come())
                control.should_save = True
                control.should_training_stop = True

    class GracefulStop(TrainerCallback):
        """On SIGTERM or SIGINT, finish the current step, save a checkpoint, and stop."""

        def __init__(self):
            self._stop = StopRequest()

        @property
        def requested(self) -> bool:
            return self._stop.requested

        def on_train_begin(self, args, state, control, **kwargs):
            self._stop.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if all_max(int(self.requested)):  # any process signalled: all save, stop and say so
                self._stop.requested = True
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            self.release()

        def release(self):
            self._stop.__exit__(None, None, None)

    class RecordWorldSize(TrainerCallback):
        """Each checkpoint says how many processes wrote it (see `record_world_size`)."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                record_world_size(Path(args.output_dir) / f"checkpoint-{state.global_step}", args.world_size)

    class LogAtSave(TrainerCallback):
        """Log the loss at every save and at the last step (after the callbacks above asked for a save), so a
        checkpoint's log history covers each of its steps and a resumed run's `train_loss` is exact."""

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True

    from align.pipeline.runlog import progress_callback
    from align.stages.continuing import schedule_callback

    budget = time_limit if isinstance(time_limit, StageBudget) else StageBudget(time_limit)
    return [GracefulStop(), TimeLimit(budget), RecordWorldSize(), LogAtSave(), progress_callback(), schedule_callback(),
            *tracking_callbacks(tracker or Tracker())]


def tracking_callbacks(tracker: Tracker) -> list:
    """Callbacks for HF/TRL trainers that log to the stage's tracker (`align.stages.tracker`): every log into
    `metrics.jsonl` and to each tracker the stage reports to (as `train/...`, `eval/...`). Ours rather than
    transformers' tracker callbacks, which open their runs themselves and a new one on each resume."""
    from transformers import TrainerCallback

    class TrackerLog(TrainerCallback):
        """Each log the Trainer makes (the records of its `log_history`), at its step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                tracker.log_training(state.global_step, logs)

    return [TrackerLog()]


def console_step_lines(trainer) -> None:
    """Have the Trainer's console progress bar write each log as `step_line` above the bar, instead of the raw
    Python dict transformers' progress callback writes there (`{'loss': '1.383', 'grad_norm': ...}`)."""
    from transformers.trainer_callback import ProgressCallback

    from align.pipeline.runlog import step_line

    class StepLines(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                self.training_bar.write(step_line(state, logs))

    handler = trainer.callback_handler
    for callback in list(handler.callbacks):
        if type(callback) is ProgressCallback:
            handler.remove_callback(callback)
            handler.add_callback(StepLines())


def check_finite(loss_value: float, step: int) -> None:
    if not math.isfinite(loss_value):
        raise TrainingError(f"loss became {loss_value} at step {step}; stopping before the optimizer step, "
                            "no checkpoint written after it. Lower the learning rate or check the data.")
