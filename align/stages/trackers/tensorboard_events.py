"""TensorBoard as a tracker: event files in the run folder (or `tracking.dir`), written with torch's writer.

Why it is built this way:
- One folder per stage run (`<run folder>/tensorboard/`, or `<dir>/<run_name>`); a resumed run writes a new
  event file there whose `purge_step` hides the steps after its checkpoint that the interrupted attempt
  logged, so TensorBoard shows one run whose steps continue (it need not skip steps: `appends_only` False).
- Hyperparameters go in as TensorBoard's hparams (flat keys, numbers and text as they are, anything else as
  JSON) and as readable text: the lineage, the config and the tracking settings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from align.stages.trackers import Hyperparameters, is_number


def tensorboard_folder(ctx) -> Path:
    """Where the stage's TensorBoard events go: `<dir>/<run_name>` (run name default `<recipe>/<stage>`)
    when `tracking.dir` is set, else the run folder's `tensorboard/`."""
    tracking = ctx.config.tracking
    if tracking.dir is None:
        return ctx.run_dir / "tensorboard"
    return Path(tracking.dir).expanduser() / (tracking.run_name or f"{ctx.recipe.name}/{ctx.name}")


class TensorBoardRun:
    name = "tensorboard"
    appends_only = False

    def __init__(self, writer, folder: Path):
        self.writer, self.folder = writer, folder

    def start(self, hyperparameters: Hyperparameters) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("stage", _markdown(hyperparameters.lineage))
        self.writer.add_text("config", "```\n" + json.dumps(hyperparameters.config, indent=2, default=str) + "\n```")
        if hyperparameters.tracking:
            self.writer.add_text("tracking", _markdown(hyperparameters.tracking))
        for summary in hparams({k: _hparam(v) for k, v in hyperparameters.flat().items()}, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log_scalars(self, step: int, figures: dict) -> None:
        for key, value in figures.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_entry(self, ref: str, step: int) -> None:
        self.writer.add_text("entry", ref, step)
        self.writer.flush()

    def log_images(self, images: dict[str, Path], step: int) -> None:
        from matplotlib.image import imread

        for name, path in images.items():
            self.writer.add_image(f"images/{name}", imread(path)[..., :3], step, dataformats="HWC")
        self.writer.flush()

    def record(self) -> str:
        return str(self.folder.resolve())

    def state(self) -> dict:
        return {}

    def close(self, failed: bool) -> None:
        self.writer.close()


def open_run(ctx, earlier: dict | None, resumed_step: int | None) -> TensorBoardRun:
    from torch.utils.tensorboard import SummaryWriter

    folder = tensorboard_folder(ctx)
    logged = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
    # Events an earlier attempt logged after this run's starting point are hidden (all of them for a fresh start).
    purge = (0 if resumed_step is None else resumed_step + 1) if logged else None
    return TensorBoardRun(SummaryWriter(log_dir=str(folder), purge_step=purge), folder)


def _hparam(value):
    """A value TensorBoard's hparams take: numbers, text and booleans as they are, anything else as JSON."""
    if isinstance(value, (bool, str)) or (is_number(value) and math.isfinite(value)):
        return value
    return json.dumps(value, default=str)


def _markdown(values: dict) -> str:
    return "\n".join(f"- **{key}**: {value}" for key, value in values.items())
