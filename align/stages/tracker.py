"""A stage's tracker: `metrics.jsonl` always, and the trackers the recipe's `report` names (TensorBoard, W&B,
MLflow), each figure logged once to all of them under the same name.

Why it is built this way:
- `report: none` by default: a run then writes no files beyond its run folder's usual ones and imports no
  tracker; `metrics.jsonl` (`align.stages.metrics_file`) is written either way, so no run is ever without
  its curve. Each tracker is a backend behind one interface (`align.stages.trackers`), imported only when
  named.
- One path for every figure: the Trainer stages' logs (SFT, reward, DPO) come through our own callback
  (`align.stages.callbacks.tracking_callbacks`), not through transformers' TensorBoard, W&B or MLflow
  callbacks, which open their runs themselves (from `output_dir` or environment variables) and would open a
  new one on each resume. They are named as transformers names them (`train/loss`, `eval/loss`); PPO's
  figures and the evaluation's (`heldout/<metric>`) keep their `metrics.jsonl` names.
- A resumed run continues the same tracker runs: their ids are kept in the run folder (`tracking.json`,
  `align.stages.trackers.state`); TensorBoard hides the steps logged after the checkpoint, and the
  trackers that keep every point (W&B, MLflow) are not sent those steps again, so each step is logged once.
- A tracker that fails while logging is reported once and left out for the rest of the run: watching a
  run never stops it.
- Only the main process logs; elsewhere the tracker is disabled (no files, no runs).
- The running stage's tracker is its context's (`StageContext.tracker`, set by `stage_tracking`), handed
  to the Trainer callbacks (`safety_callbacks`) and used by the PPO loop and `register_entry` alike.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path

from align.config.schema import TRACKER_NAMES
from align.stages.metrics_file import METRICS_FILE, MetricsFile
from align.stages.trackers import (
    BACKENDS,
    Backend,
    Hyperparameters,
    is_number,
    numbers,
    open_backend,
)
from align.stages.trackers.state import TRACKING_FILE, TrackingState
from align.stages.trackers.tensorboard_events import tensorboard_folder

log = logging.getLogger(__name__)

BUILT = tuple(BACKENDS)  # the trackers this version writes; the other TRACKER_NAMES are planned
__all__ = [
    "Tracker",
    "evaluation_figures",
    "open_tracker",
    "report_names",
    "stage_tracking",
    "tensorboard_folder",
    "tracker_problem",
    "tracking_problems",
    "trainer_figures",
]

# Which tracker reads each tracking setting that only one reads (the others are shared).
SETTING_READERS = {"tracking_uri": "mlflow", "offline": "wandb", "entity": "wandb"}


def report_names(report) -> list[str]:
    """A stage's `report` as the list of its trackers (`none`: [])."""
    if report in (None, "none"):
        return []
    return [report] if isinstance(report, str) else list(report)


def tracker_problem(name: str) -> str | None:
    """Why tracker `name` cannot be used here, or None."""
    if name in TRACKER_NAMES and name not in BUILT:
        return (f"{name} is not supported yet by this version of align (supported: {', '.join(BUILT)}); "
                "every run writes metrics.jsonl in its run folder meanwhile")
    _, package, extra = BACKENDS[name]
    if importlib.util.find_spec(package) is None:
        return f'{name} is not installed: pip install "align[{extra}]"'
    return None


def tracking_problems(cfg) -> list[tuple[str, str]]:
    """(key under the stage, why) for each `tracking` setting the stage's trackers cannot honour: a setting
    only a tracker the stage does not report to reads (when it reports to any), W&B online without
    credentials."""
    names = report_names(cfg.report)
    problems = [(f"tracking.{key}", (f"only {reader} reads `{key}`, and this stage reports to {', '.join(names)}; "
                                     f"add {reader} to `report` or remove `{key}`"))
                for key, reader in SETTING_READERS.items()
                if names and getattr(cfg.tracking, key) is not None and reader not in names]
    if "wandb" in names:
        from align.stages.trackers.wandb_run import offline_problem

        why = offline_problem(cfg.tracking)
        if why:
            problems.append(("tracking.offline", why))
    return problems


def evaluation_figures(metrics: dict) -> dict:
    """The evaluation's numbers as logged: `heldout/<name>`, the manifest's metric name without its
    `heldout_` prefix; training figures (`train_*`) and the parent's copies (`*_before`) are logged elsewhere."""
    return {f"heldout/{key.removeprefix('heldout_')}": value for key, value in metrics.items()
            if is_number(value) and not key.startswith("train_") and not key.endswith("_before")}


def trainer_figures(logs: dict) -> dict:
    """A Trainer log's numbers under the names transformers' trackers give them: `eval_x` as `eval/x`,
    `test_x` as `test/x`, anything else `train/<name>`."""
    renamed = {}
    for key, value in numbers(logs).items():
        split = next((p for p in ("eval", "test") if key.startswith(f"{p}_")), None)
        renamed[f"{split}/{key[len(split) + 1:]}" if split else f"train/{key}"] = value
    return renamed


class Tracker:
    """Where one stage run logs: its metrics file and its trackers' runs (`backends`). A tracker without a
    metrics file (another process than the main one) logs nothing."""

    def __init__(self, metrics: MetricsFile | None = None, backends: list[Backend] | None = None,
                 state: TrackingState | None = None):
        self.metrics, self.backends, self.state = metrics, list(backends or []), state
        self._records = {}

    @property
    def writer(self):
        """The TensorBoard writer, or None when the stage does not report to TensorBoard."""
        return next((b.writer for b in self.backends if b.name == "tensorboard"), None)

    def log_training(self, step: int, logs: dict) -> None:
        """A Trainer's log at `step`: into metrics.jsonl as it is, to the trackers as `train/...`, `eval/...`."""
        if self.metrics is not None:
            self.metrics.log(step, logs)
        self._scalars(step, trainer_figures(logs))

    def log_step(self, step: int, figures: dict) -> None:
        """One step of our own loop (PPO): metrics.jsonl and every tracker, the same names."""
        if self.metrics is not None:
            self.metrics.log(step, figures)
        self._scalars(step, numbers(figures))

    def log_evaluation(self, step: int, metrics: dict) -> None:
        """The evaluation hook's figures: the parent's at step 0, the trained model's at the last step."""
        figures = evaluation_figures(metrics)
        if figures:
            self.log_step(step, figures)

    def log_start(self, config_dump: dict, lineage: dict, tracking) -> None:
        """The resolved stage config, the entry's lineage and hashes, and the tracking settings that are set,
        as hyperparameters (a fresh run only: a resumed one has them already)."""
        settings = {key: value for key, value in tracking.model_dump().items() if value not in (None, [])}
        hyperparameters = Hyperparameters(config_dump, lineage, settings)
        self._each("start", lambda b: b.start(hyperparameters))

    def log_entry(self, ref: str, step: int, folder: Path | None = None) -> None:
        """The registered entry's ref (its version is known only then) and its pictures (`folder`'s PNGs)."""
        images = {path.stem: path for path in sorted(Path(folder).glob("*.png"))} if folder else {}
        self._each("entry", lambda b: b.log_entry(ref, step))
        if images:
            self._each("images", lambda b: b.log_images(images, step))

    def record(self) -> dict:
        """The manifest's `tracking` section: the files and runs this run wrote to (only those that apply)."""
        record = {"metrics": str(self.metrics.path.resolve())} if self.metrics is not None else {}
        return {**record, **self._records, **{b.name: b.record() for b in self.backends}}

    def close(self, failed: bool = False) -> None:
        self._each("close", lambda b: b.close(failed))
        if self.metrics is not None:
            self.metrics.close()

    def _scalars(self, step: int, figures: dict) -> None:
        if not figures:
            return
        for backend in list(self.backends):
            skips = backend.appends_only and self.state is not None
            unsent = self.state.unsent(backend.name, step, figures) if skips else figures
            if unsent and self._call(backend, "log", lambda b, sent=unsent: b.log_scalars(step, sent)) and skips:
                self.state.sent(backend.name, step, unsent)

    def _each(self, what: str, call) -> None:
        for backend in list(self.backends):
            self._call(backend, what, call)

    def _call(self, backend: Backend, what: str, call) -> bool:
        try:
            call(backend)
            return True
        except Exception as err:  # noqa: BLE001 - a tracker failing never stops the training it watches
            log.warning("%s failed (%s: %s): not logging to it for the rest of this run", backend.name, what, err)
            self.backends.remove(backend)
            with contextlib.suppress(Exception):  # where its run is, as far as it got
                self._records[backend.name] = backend.record()
            return False


def open_tracker(ctx, resumed_step: int | None) -> Tracker:
    """The tracker of a stage run (`resumed_step`: its checkpoint's step, None for a fresh start); disabled
    on processes other than the main one."""
    from align.runtime.distributed import is_main

    if not is_main():
        return Tracker()
    metrics = MetricsFile(ctx.run_dir / METRICS_FILE, resumed_step)
    names = report_names(ctx.config.report)
    if not names:
        return Tracker(metrics)
    state, backends = TrackingState(ctx.run_dir / TRACKING_FILE, fresh=resumed_step is None), []
    try:
        for name in names:
            backend = open_backend(name, ctx, state.earlier(name), resumed_step)
            backends.append(backend)
            if backend.state():  # a run to reopen (TensorBoard's folder is found again by itself)
                state.opened(name, backend.state())
    except BaseException:
        Tracker(metrics, backends).close(failed=True)
        raise
    return Tracker(metrics, backends, state)


@contextlib.contextmanager
def stage_tracking(ctx, resumed_step: int | None):
    """The stage run's tracker, as `ctx.tracker` while the run trains and registers, closed at the end
    whatever happens (its tracker runs marked failed when the stage raised)."""
    tracker = open_tracker(ctx, resumed_step)
    ctx.tracker = tracker
    failed = True
    try:
        yield tracker
        failed = False
    finally:
        ctx.tracker = Tracker()
        tracker.close(failed)
