"""`tracking.json` in a stage's run folder: the tracker runs a stage run logs to, so a resumed run reopens them.

Why it is built this way:
- W&B and MLflow name a run by an id they hand out; a resumed stage run continues the same tracker run only
  if that id was kept where the resume finds it: the run folder, beside its checkpoints.
- Those two keep every point they are sent, so a resumed run that sent again the steps the interrupted
  attempt logged after its checkpoint would show them twice. Each run's record keeps the last step sent and
  the names sent at it (`last_step`, `keys_at_last_step`); a resumed run sends only what comes after, so
  every step is logged once. The figures of the steps it skips are the interrupted attempt's: those steps
  are trained again from the same checkpoint on the same batches, so they are the same steps.
  (TensorBoard needs none of this: its `purge_step` hides the old events instead.)
- Written whole (temporary file and rename) at every change, so a crash leaves the last good record; a fresh
  start (no checkpoint) forgets the earlier runs and opens new ones.
"""

from __future__ import annotations

from pathlib import Path

from align.registry.records import read_json_record, write_json_atomic

TRACKING_FILE = "tracking.json"


class TrackingState:
    """The tracker runs of one stage run, by tracker name, read from and written to `path`."""

    def __init__(self, path: Path, fresh: bool):
        self.path = Path(path)
        self.runs: dict[str, dict] = {} if fresh else dict(read_json_record(self.path) or {})
        self._sent_before: dict[str, tuple[int, set]] = {}

    def earlier(self, name: str) -> dict | None:
        """Tracker `name`'s run as an earlier attempt left it, or None."""
        run = self.runs.get(name)
        return run if isinstance(run, dict) and run.get("run_id") else None

    def opened(self, name: str, state: dict) -> None:
        """Record the run tracker `name` logs to now (its `state()`); a reopened run keeps its last step."""
        earlier = self.earlier(name) or {}
        same = earlier.get("run_id") == state.get("run_id")
        last = earlier.get("last_step", -1) if same else -1
        keys = set(earlier.get("keys_at_last_step", [])) if same else set()
        self._sent_before[name] = (last, keys)
        self.runs[name] = {**state, "last_step": last, "keys_at_last_step": sorted(keys)}
        self._write()

    def unsent(self, name: str, step: int, figures: dict) -> dict:
        """The figures of `step` that earlier attempts of tracker `name`'s run have not sent already."""
        last, keys = self._sent_before.get(name, (-1, set()))
        if step < last:
            return {}
        return {k: v for k, v in figures.items() if k not in keys} if step == last else figures

    def sent(self, name: str, step: int, keys) -> None:
        """Tracker `name` was sent `keys` at `step`."""
        run = self.runs[name]
        if step > run["last_step"]:
            run["last_step"], run["keys_at_last_step"] = step, sorted(keys)
        elif step == run["last_step"] and not set(keys) <= set(run["keys_at_last_step"]):
            run["keys_at_last_step"] = sorted(set(run["keys_at_last_step"]) | set(keys))
        else:
            return
        self._write()

    def _write(self) -> None:
        write_json_atomic(self.path, self.runs)
