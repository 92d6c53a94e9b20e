"""MLflow as a tracker: one MLflow run per stage run, in the experiment named by `tracking.project`.

Why it is built this way:
- Through `MlflowClient`, not MLflow's fluent API (`mlflow.start_run`) or transformers' `MLflowCallback`:
  no process-wide active run is touched (a user's own run stays theirs), and the run is named by its id, so a
  resumed stage run logs to the run it started (its id is kept in `tracking.json`, its status set back to
  RUNNING) instead of opening a new one as the callback, configured from environment variables, would.
- Where: `tracking.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else a file store `mlruns/` in the run
  folder (or `tracking.dir`), so a run needs no server. MLflow 3 refuses file stores unless
  `MLFLOW_ALLOW_FILE_STORE` is set; it is set for this process when the store is a file store (a database
  store needs the full `mlflow` package; a server needs nothing more).
- MLflow keeps every point it is sent: the steps a resumed run would log twice are skipped by the tracker
  (`align.stages.trackers.state`). Parameters cannot change once logged, so only a fresh run logs them.
- Names as every tracker shows them, with two exceptions. A file store keeps each metric as a file at its
  name's path, and `reward` beside `reward/regex` (PPO's total and per-source rewards) cannot be both a file
  and a folder: in a file store `/` in a name is written `.` (`train.loss`, `reward.regex`); other stores
  keep the names as they are. Characters MLflow refuses in a name (other than letters, digits, `_ - . / :`
  and space) become `_`. MLflow logs only warnings, so the console shows align's lines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from align.stages.trackers import Hyperparameters

PARAMS_PER_CALL, METRICS_PER_CALL, PARAM_LENGTH = 100, 1000, 6000  # MLflow's limits


def tracking_uri(ctx) -> str:
    """The MLflow store of the stage run: `tracking.tracking_uri` (a plain path is a local file store),
    else `$MLFLOW_TRACKING_URI`, else `mlruns/` in `tracking.dir` or the run folder."""
    tracking = ctx.config.tracking
    given = tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if given and urlsplit(given).scheme:
        return given
    folder = Path(given) if given else (Path(tracking.dir) if tracking.dir else ctx.run_dir) / "mlruns"
    return folder.expanduser().resolve().as_uri()


def mlflow_name(name: str, file_store: bool = False) -> str:
    """`name` as MLflow stores it: the characters it refuses in a metric, parameter or tag name replaced by
    `_`, and in a file store `/` by `.` (a name's path must not be another name's folder)."""
    name = re.sub(r"[^/\w.\- :]", "_", name)[:250]
    return name.replace("/", ".") if file_store else name


class MlflowRun:
    name = "mlflow"
    appends_only = True

    def __init__(self, client, run_id: str, experiment_id: str, experiment: str, uri: str):
        self.client, self.run_id, self.experiment_id, self.experiment, self.uri = (
            client, run_id, experiment_id, experiment, uri)
        self.file_store = urlsplit(uri).scheme == "file"

    def start(self, hyperparameters: Hyperparameters) -> None:
        from mlflow.entities import Param

        params = [Param(mlflow_name(key, self.file_store), _text(value)[:PARAM_LENGTH])
                  for key, value in hyperparameters.flat().items()]
        for first in range(0, len(params), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[first:first + PARAMS_PER_CALL])

    def log_scalars(self, step: int, figures: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(key, self.file_store), float(value), now, step) for key, value in figures.items()]
        for first in range(0, len(metrics), METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[first:first + METRICS_PER_CALL])

    def log_entry(self, ref: str, step: int) -> None:
        self.client.set_tag(self.run_id, "align.entry", ref)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        for path in images.values():
            self.client.log_artifact(self.run_id, str(path), "images")

    def record(self) -> dict:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "experiment": self.experiment,
                "tracking_uri": self.uri}

    def state(self) -> dict:
        return self.record()

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def open_run(ctx, earlier: dict | None, resumed_step: int | None) -> MlflowRun:
    """The stage run's MLflow run: `earlier`'s when resuming in the same store and experiment and that run
    is still there, else a new one."""
    uri = tracking_uri(ctx)
    if urlsplit(uri).scheme == "file":
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow_logger = logging.getLogger("mlflow")
    if mlflow_logger.level == logging.NOTSET:
        mlflow_logger.setLevel(logging.WARNING)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking, client = ctx.config.tracking, MlflowClient(uri)
    experiment_name = tracking.project or ctx.recipe.name
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        experiment_id = client.create_experiment(experiment_name)
    else:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    run_id = None
    if resumed_step is not None and earlier and (earlier.get("tracking_uri"), earlier.get("experiment_id")) == (
            uri, experiment_id):
        try:
            if client.get_run(earlier["run_id"]).info.lifecycle_stage == "active":
                run_id = earlier["run_id"]
                client.update_run(run_id, status="RUNNING")
        except MlflowException:  # deleted from the store meanwhile: a new run
            run_id = None
    if run_id is None:
        tags = {"align.recipe": ctx.recipe.name, "align.stage": ctx.name, "align.kind": ctx.config.kind,
                **{mlflow_name(tag, urlsplit(uri).scheme == "file"): "" for tag in tracking.tags}}
        run_id = client.create_run(experiment_id, run_name=tracking.run_name or f"{ctx.recipe.name}/{ctx.name}",
                                   tags=tags).info.run_id
    return MlflowRun(client, run_id, experiment_id, experiment_name, uri)


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)
