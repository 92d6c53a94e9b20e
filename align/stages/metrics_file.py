"""`metrics.jsonl` in a stage's run folder: one JSON line per logged step, written as it happens.

Why it is built this way:
- Always written, tracker or not, so every run can be plotted or compared later with nothing but a JSON
  reader (jq, pandas), and a run that crashed still has its curve up to the crash.
- Unbuffered, one whole line per write: a crash loses at most the line being written.
- One line per step: figures logged at the same step (the Trainer's training and evaluation logs, the
  evaluation hook after the last step) are merged into that step's line, by rewriting the last line.
- A resumed run first drops the lines of the steps after the checkpoint it resumes from (they are trained
  and logged again), so the file never holds a step twice; a fresh start begins an empty file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsFile:
    """Appends step records to `path`; `resumed_step`: the step of the checkpoint a resumed run starts from
    (None: a fresh start, the file is emptied)."""

    def __init__(self, path: Path, resumed_step: int | None):
        self.path = Path(path)
        kept = kept_lines(self.path, resumed_step) if resumed_step is not None else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text("".join(line + "\n" for line in kept))
        os.replace(partial, self.path)  # whole or not at all: a crash here keeps the old file
        self._file = open(self.path, "ab", buffering=0)
        self._last: dict | None = json.loads(kept[-1]) if kept else None
        self._last_at = self.path.stat().st_size - (len(kept[-1].encode()) + 1 if kept else 0)

    def log(self, step: int, figures: dict) -> None:
        """Write step `step`'s figures (merged into the last line when that line is the same step's)."""
        record = {"step": step, **{k: v for k, v in figures.items() if k != "step"}}
        if self._last is not None and self._last.get("step") == step:
            record = {**self._last, **record}
            self._file.truncate(self._last_at)
        else:
            self._last_at = self._file.seek(0, os.SEEK_END)
        self._file.write((json.dumps(record, default=str) + "\n").encode())
        self._last = record

    def close(self) -> None:
        self._file.close()


def kept_lines(path: Path, through_step: int) -> list[str]:
    """The lines of `path` for steps up to `through_step`, in order; a torn or unreadable line is dropped."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= through_step:
            kept.append(line)
    return kept


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
