"""Weights & Biases as a tracker: one W&B run per stage run, reopened by its id when the stage run resumes.

Why it is built this way:
- The run is opened here, from the recipe (project, name, tags, entity, id), not by transformers'
  `WandbCallback`, which opens its run from environment variables and would open a new one on each resume;
  the Trainer stages' figures reach it through the stage's tracker (`align.stages.callbacks`).
- It never waits for a login or a server: `tracking.offline: true` logs offline; unset, `$WANDB_MODE` decides,
  else it is online when W&B credentials are found (`$WANDB_API_KEY`, or the `.netrc` entry `wandb login`
  writes) and offline otherwise, saying so once. An online start that fails falls back to offline with a
  warning: a tracker outage never costs a training run. `wandb sync <dir>` uploads an offline run later.
- The x-axis is the training step: every row carries `step` and every figure is plotted against it
  (`define_metric("*", step_metric="step")`), while W&B's own `_step` just counts rows. Rows of one training
  step (training and evaluation figures) need no merging, and a resumed run (whose W&B counter starts again
  offline) never meets W&B's refusal of a step lower than its last; the steps it would log twice are
  skipped by the tracker (`align.stages.trackers.state`).
- Quiet: W&B's own lines are silenced and the console is not captured, so the user sees align's lines.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from align.stages.trackers import Hyperparameters

log = logging.getLogger(__name__)


def wandb_folder(ctx) -> Path:
    """Where W&B writes its local files (`<folder>/wandb/`): `tracking.dir`, else the run folder."""
    tracking = ctx.config.tracking
    return Path(tracking.dir).expanduser() if tracking.dir else ctx.run_dir


def credentials_found() -> bool:
    """Whether W&B has credentials to go online with, without asking it (which might prompt): an API key or
    identity token in the environment, or a `.netrc` entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(offline: bool | None) -> str:
    """`online` or `offline`, from `tracking.offline`, else `$WANDB_MODE`, else whether credentials are found;
    online without credentials (W&B would prompt for a key) is offline."""
    mode = {True: "offline", False: "online"}.get(offline) or os.environ.get("WANDB_MODE") or (
        "online" if credentials_found() else "offline")
    if mode == "online" and not credentials_found():
        log.warning("W&B: no credentials found (WANDB_API_KEY, `wandb login`): logging offline")
        return "offline"
    if mode != "online" and offline is None and not os.environ.get("WANDB_MODE"):
        log.info("W&B: no credentials found (WANDB_API_KEY, `wandb login`): logging offline; `wandb sync` "
                 "uploads the run later")
    return mode


def offline_problem(tracking) -> str | None:
    """Why `tracking.offline: false` cannot be honoured here, or None (for the plan)."""
    if tracking.offline is False and not credentials_found():
        return ("W&B online needs credentials: run `wandb login` or set WANDB_API_KEY, or leave `offline` unset "
                "to log offline when none are found")
    return None


class WandbRun:
    name = "wandb"
    appends_only = True

    def __init__(self, run, project: str, entity: str | None, earlier_dirs: list[str] = ()):
        self.run, self.project, self.entity = run, project, entity
        # Offline, every attempt of a resumed run writes its own folder; `wandb sync` needs them all.
        here = str(Path(run.settings.sync_dir).resolve())
        self.dirs = [d for d in earlier_dirs if d != here] + [here]

    def start(self, hyperparameters: Hyperparameters) -> None:
        self.run.config.update(hyperparameters.nested(), allow_val_change=True)

    def log_scalars(self, step: int, figures: dict) -> None:
        self.run.log({**figures, "step": step})

    def log_entry(self, ref: str, step: int) -> None:
        self.run.summary["entry"] = ref

    def log_images(self, images: dict[str, Path], step: int) -> None:
        import wandb

        if images:
            self.run.log({**{f"images/{name}": wandb.Image(str(path)) for name, path in images.items()}, "step": step})

    def record(self) -> dict:
        """The run's id, project and mode, its local folder (`dirs`: every attempt's, when resumed), its URL."""
        record = {"run_id": self.run.id, "project": self.project, "mode": "offline" if self.run.offline else "online",
                  "dir": self.dirs[-1], **({"dirs": self.dirs} if len(self.dirs) > 1 else {})}
        if not self.run.offline:
            record.update(entity=self.run.entity, url=self.run.url)
        return record

    def state(self) -> dict:
        return {"run_id": self.run.id, "project": self.project, "entity": self.entity, "dirs": self.dirs}

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_run(ctx, earlier: dict | None, resumed_step: int | None) -> WandbRun:
    """The stage run's W&B run: `earlier`'s (same id) when resuming in the same project and entity."""
    import wandb

    tracking = ctx.config.tracking
    project = tracking.project or ctx.recipe.name
    folder = wandb_folder(ctx)
    folder.mkdir(parents=True, exist_ok=True)  # W&B warns of a missing git root when it does not exist yet
    same = bool(earlier) and (earlier.get("project"), earlier.get("entity")) == (project, tracking.entity)
    run_id = earlier["run_id"] if resumed_step is not None and same else None
    arguments = {"project": project, "entity": tracking.entity, "group": ctx.recipe.name, "job_type": ctx.config.kind,
                 "name": tracking.run_name or f"{ctx.recipe.name}/{ctx.name}", "tags": list(tracking.tags) or None,
                 "dir": str(folder), "id": run_id, "resume": "allow" if run_id else None, "reinit": "create_new",
                 "settings": wandb.Settings(silent=True, console="off")}
    mode = wandb_mode(tracking.offline)
    try:
        run = wandb.init(mode=mode, **arguments)
    except Exception as err:
        if mode == "offline":
            raise
        log.warning("W&B: could not start an online run (%s): logging offline to %s", err, folder)
        run = wandb.init(mode="offline", **arguments)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return WandbRun(run, project, tracking.entity, earlier.get("dirs", []) if run_id else [])
