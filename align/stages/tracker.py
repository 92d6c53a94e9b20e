"""A stage's tracker run: `metrics.jsonl` always, TensorBoard when the recipe's `report` asks for it.

Why it is built this way:
- `report: none` by default: a run then writes no files beyond its run folder's usual ones and imports no
  tracker; `report: tensorboard` is one word away, and `metrics.jsonl` (`align.stages.metrics_file`) is
  written either way, so no run is ever without its curve.
- The Trainer stages (SFT, reward, DPO) log training through transformers' own TensorBoard callback, on
  this tracker's writer (`align.stages.callbacks`): transformers 5 has no `logging_dir`, and `report_to`
  would open a writer of its own under `output_dir/runs/<time>/`, a new folder on every resume. PPO (our
  loop) and the evaluation hook's figures before and after training log through `Tracker` itself, under
  the names `metrics.jsonl` uses.
- One folder per stage run (`<run folder>/tensorboard/`, or `tracking.dir`); a resumed run writes a new
  event file there whose `purge_step` hides the steps after its checkpoint that the interrupted attempt
  logged, so TensorBoard shows one run whose steps continue.
- Only the main process logs; elsewhere the tracker is disabled (no files, no writer).
- The running stage's tracker is its context's (`StageContext.tracker`, set by `stage_tracking`), handed
  to the Trainer callbacks (`safety_callbacks`) and used by the PPO loop and `register_entry` alike.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

from align.config.schema import TRACKER_NAMES
from align.stages.metrics_file import METRICS_FILE, MetricsFile

BUILT = ("tensorboard",)  # the trackers this version writes; the other TRACKER_NAMES are planned


def report_names(report) -> list[str]:
    """A stage's `report` as the list of its trackers (`none`: [])."""
    if report in (None, "none"):
        return []
    return [report] if isinstance(report, str) else list(report)


def tracker_problem(name: str) -> str | None:
    """Why tracker `name` cannot be used here, or None."""
    import importlib.util

    if name in TRACKER_NAMES and name not in BUILT:
        return (f"{name} is not supported yet by this version of align (supported: {', '.join(BUILT)}); "
                "every run writes metrics.jsonl in its run folder meanwhile")
    if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        return 'tensorboard is not installed: pip install "align[tensorboard]"'
    return None


def tensorboard_folder(ctx) -> Path:
    """Where the stage's TensorBoard events go: `<dir>/<run_name>` (run name default `<recipe>/<stage>`)
    when `tracking.dir` is set, else the run folder's `tensorboard/`."""
    tracking = ctx.config.tracking
    if tracking.dir is None:
        return ctx.run_dir / "tensorboard"
    return Path(tracking.dir).expanduser() / (tracking.run_name or f"{ctx.recipe.name}/{ctx.name}")


def evaluation_figures(metrics: dict) -> dict:
    """The evaluation's numbers as logged: `heldout/<name>`, the manifest's metric name without its
    `heldout_` prefix; training figures (`train_*`) and the parent's copies (`*_before`) are logged elsewhere."""
    return {f"heldout/{key.removeprefix('heldout_')}": value for key, value in metrics.items()
            if is_number(value) and not key.startswith("train_") and not key.endswith("_before")}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Tracker:
    """Where one stage run logs: its metrics file, and a TensorBoard writer (or None). A tracker without a
    metrics file (another process than the main one) logs nothing."""

    def __init__(self, metrics: MetricsFile | None = None, writer=None, tensorboard_dir: Path | None = None):
        self.metrics, self.writer, self.tensorboard_dir = metrics, writer, tensorboard_dir

    def log_training(self, step: int, logs: dict) -> None:
        """A Trainer's log at `step`: into metrics.jsonl (its TensorBoard callback writes the events)."""
        if self.metrics is not None:
            self.metrics.log(step, logs)

    def log_step(self, step: int, figures: dict) -> None:
        """One step of our own loop (PPO): metrics.jsonl and TensorBoard, the same names."""
        self.log_training(step, figures)
        self._scalars(step, figures)

    def log_evaluation(self, step: int, metrics: dict) -> None:
        """The evaluation hook's figures: the parent's at step 0, the trained model's at the last step."""
        figures = evaluation_figures(metrics)
        if figures:
            self.log_step(step, figures)

    def log_start(self, config_dump: dict, lineage: dict, tracking) -> None:
        """The resolved stage config, the entry's lineage and hashes, and the tracking settings, as
        hyperparameters and text (a fresh run only: a resumed one has them in its first event file)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("stage", _markdown(lineage))
        self.writer.add_text("config", "```\n" + json.dumps(config_dump, indent=2, default=str) + "\n```")
        settings = {key: value for key, value in tracking.model_dump().items() if value not in (None, [])}
        if settings:
            self.writer.add_text("tracking", _markdown(settings))
        flat = {**_flat(config_dump), **{f"lineage.{k}": v for k, v in lineage.items()},
                **{f"tracking.{k}": v for k, v in _flat(settings).items()}}
        for summary in hparams({k: _hparam(v) for k, v in flat.items()}, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log_entry(self, ref: str, step: int) -> None:
        """The registered entry's ref, once registered (its version is known only then)."""
        if self.writer is not None:
            self.writer.add_text("entry", ref, step)
            self.writer.flush()

    def record(self) -> dict:
        """The manifest's `tracking` section: the files this run wrote (only those that apply)."""
        record = {}
        if self.metrics is not None:
            record["metrics"] = str(self.metrics.path.resolve())
        if self.tensorboard_dir is not None:
            record["tensorboard"] = str(self.tensorboard_dir.resolve())
        return record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()

    def _scalars(self, step: int, figures: dict) -> None:
        if self.writer is None:
            return
        for key, value in figures.items():
            if key != "step" and is_number(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()


def open_tracker(ctx, resumed_step: int | None) -> Tracker:
    """The tracker of a stage run (`resumed_step`: its checkpoint's step, None for a fresh start); disabled
    on processes other than the main one."""
    from align.runtime.distributed import is_main

    if not is_main():
        return Tracker()
    metrics = MetricsFile(ctx.run_dir / METRICS_FILE, resumed_step)
    if "tensorboard" not in report_names(ctx.config.report):
        return Tracker(metrics)
    from torch.utils.tensorboard import SummaryWriter

    folder = tensorboard_folder(ctx)
    earlier = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
    # Events an earlier attempt logged after this run's starting point are hidden (all of them for a fresh start).
    purge = (0 if resumed_step is None else resumed_step + 1) if earlier else None
    return Tracker(metrics, SummaryWriter(log_dir=str(folder), purge_step=purge), folder)


@contextlib.contextmanager
def stage_tracking(ctx, resumed_step: int | None):
    """The stage run's tracker, as `ctx.tracker` while the run trains and registers, closed at the end
    whatever happens."""
    tracker = open_tracker(ctx, resumed_step)
    ctx.tracker = tracker
    try:
        yield tracker
    finally:
        ctx.tracker = Tracker()
        tracker.close()


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _hparam(value):
    """A value TensorBoard's hparams take: numbers, text and booleans as they are, anything else as JSON."""
    if isinstance(value, (bool, str)) or (is_number(value) and math.isfinite(value)):
        return value
    return json.dumps(value, default=str)


def _markdown(values: dict) -> str:
    return "\n".join(f"- **{key}**: {value}" for key, value in values.items())
