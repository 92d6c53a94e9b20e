"""Preference rows from the playground: a person's pick between two answers, written where the reward,
DPO and KTO stages read it as it is.

Each row is the explicit shape of `align.data.preference`: `prompt` (the conversation both columns
answered, as chat messages), `chosen` and `rejected` (the two answers' text), plus what produced them
(`chosen_ref`, `rejected_ref`, each side's generation settings, the time). A tie teaches no preference, so
it does not go into that file: it is kept beside it (`<name>.ties.jsonl`, both answers and refs) for
whoever wants to count or relabel ties. Rows are appended whole (one write of a line, flushed and synced
under a lock), so a server stopped at any moment never leaves a half row for a stage to trip on.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from align.errors import AlignError


class PreferenceLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ties_path = self.path.with_name(self.path.stem + ".ties" + (self.path.suffix or ".jsonl"))
        self._lock = threading.Lock()
        if self.path.is_dir():
            raise AlignError(f"--prefs {self.path}: a folder; name a .jsonl file")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def counts(self) -> dict:
        return {"path": str(self.path), "rows": _lines(self.path), "ties": _lines(self.ties_path),
                "ties_path": str(self.ties_path)}

    def record(self, prompt: list[dict], answers: list[dict], verdict: str) -> dict:
        """Write the pick between `answers` [a, b] (each {"ref", "text", "settings"}) to `prompt`:
        verdict "a", "b" or "tie". Returns the new counts."""
        if verdict not in ("a", "b", "tie"):
            raise ValueError(f"verdict must be a, b or tie, not {verdict!r}")
        if len(answers) != 2 or not all(a.get("text", "").strip() for a in answers):
            raise ValueError("a preference compares two non-empty answers")
        if not prompt or prompt[-1].get("role") != "user":
            raise ValueError("the prompt must end with the user's message")
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if verdict == "tie":
            row, path = {"prompt": prompt, "responses": [a["text"] for a in answers],
                         "refs": [a.get("ref") for a in answers], "time": when}, self.ties_path
        else:
            chosen, rejected = (answers[0], answers[1]) if verdict == "a" else (answers[1], answers[0])
            row = {"prompt": prompt, "chosen": chosen["text"], "rejected": rejected["text"],
                   "chosen_ref": chosen.get("ref"), "rejected_ref": rejected.get("ref"),
                   "chosen_settings": chosen.get("settings"), "rejected_settings": rejected.get("settings"),
                   "time": when}
            path = self.path
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        with self._lock:
            with open(path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        return self.counts()


def _lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
