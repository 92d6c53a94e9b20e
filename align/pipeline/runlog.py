"""Each stage's log file, `runs/<recipe>/<stage>/log.txt`: align's own log lines and the training figures.

Why: the console shows progress bars redrawn with carriage returns and is gone once the terminal is; a run
folder that outlives it should say what happened in it. The file gets every record of align's loggers (and
warnings from any logger), one line each, and a line per logged training step (`progress_callback`; the
console gets the same line above its progress bar, `align.stages.callbacks.console_step_lines`). Progress
bars never reach it: they are not log records, and a carriage return in a message keeps only what a
terminal would show last. Each session starts with a header line and appends, so a resumed or continued
run adds to the same file; a stage that fails ends its part with the error. Only the main process writes.

A run folder discarded while the stage runs (a changed run started afresh, `--force`) takes the file with it;
the next line written recreates it with everything this session had logged.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import sys
from pathlib import Path

LOG_FILE = "log.txt"
PROGRESS_LOGGER = "align.progress"  # training figures: to the run's log file, not the console
FORMAT, DATE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
logging.getLogger(PROGRESS_LOGGER).propagate = False  # never the console, also outside a stage (`make bench`)


class RunLogHandler(logging.Handler):
    """Appends formatted records to `path`, opened per line (the folder may be removed and made again)."""

    def __init__(self, path: Path):
        super().__init__(level=logging.DEBUG)
        self.path, self.lines = Path(path), []
        self.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        self.addFilter(_wanted)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)

    def write(self, text: str) -> None:
        """One entry (possibly several lines), carriage-return redraws reduced to their last state."""
        text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines())
        self.lines.append(text)
        fresh = not self.path.exists()
        if fresh:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(("\n".join(self.lines) if fresh else text) + "\n")


def _wanted(record: logging.LogRecord) -> bool:
    return record.name == "align" or record.name.startswith("align.") or record.levelno >= logging.WARNING


@contextlib.contextmanager
def stage_log(run_dir: Path, stage: str):
    """While a stage runs: its records (INFO and up, DEBUG with `-v`) also go to `run_dir/log.txt`."""
    from align.runtime.distributed import is_main

    if not is_main():
        yield None
        return
    handler = RunLogHandler(Path(run_dir) / LOG_FILE)
    loggers = [logging.getLogger(), logging.getLogger(PROGRESS_LOGGER)]
    align_logger, progress = logging.getLogger("align"), loggers[1]
    levels = (align_logger.level, progress.level, progress.propagate)
    if align_logger.getEffectiveLevel() > logging.INFO:  # a library caller that set no level: the file still gets INFO
        align_logger.setLevel(logging.INFO)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    for logger in loggers:
        logger.addHandler(handler)
    stamp = _dt.datetime.now().isoformat(sep=" ", timespec="seconds")
    handler.write(f"==== {stamp} align {' '.join(sys.argv[1:])} | stage {stage} | pid {os.getpid()} ====")
    try:
        yield handler
    except BaseException as err:
        handler.write(f"{_dt.datetime.now().strftime(DATE_FORMAT)} ERROR align: stage {stage} stopped: "
                      f"{type(err).__name__}: {err}")
        raise
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        align_logger.level, progress.level, progress.propagate = levels


def step_line(state, logs: dict) -> str:
    """One logged step's figures (loss, learning rate, grad norm, eval loss, ...) as one line."""
    figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items()
                        if k != "total_flos")
    return f"step {state.global_step}/{state.max_steps}: {figures}"


def progress_callback():
    """A `TrainerCallback` writing each logged step's figures as one line to the run's log file."""
    from transformers import TrainerCallback

    class LogProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                logging.getLogger(PROGRESS_LOGGER).info("%s", step_line(state, logs))

    return LogProgress()
