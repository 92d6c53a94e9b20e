"""A stage's time budget, end to end: `time_limit_minutes` counts from the stage's start (loading, the
reference pass, the parent's baseline evaluation) to its registry entry, not from its first training step.

Why: a limit on training alone let a DPO stage run twice its limit on a slower CPU (a long reference pass
before training, then the evaluation after it).
Training stops early enough to leave the final evaluation its time: the parent's baseline evaluation is
the same work and is measured, and the held-out pass is estimated from the training steps' own pace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MARGIN_SECONDS = 20.0      # saving the last checkpoint and writing the registry entry
FORWARD_SHARE = 0.4        # a no-grad pass over a row costs about this share of a training step's row


@dataclass
class StageBudget:
    """The clock of one stage. `minutes` None: no limit. `heldout_rows`/`rows_per_step` size the held-out
    pass the stage runs after training; `reserve` adds measured work still to come (the final evaluation)."""

    minutes: float | None
    started: float = field(default_factory=lambda: time.monotonic())
    reserved: float = 0.0
    heldout_rows: int = 0
    rows_per_step: int = 1
    _step_seconds: list[float] = field(default_factory=list)
    _last: float | None = None

    def reserve(self, seconds: float) -> None:
        self.reserved += max(0.0, seconds)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step_done(self) -> None:
        """Record a training step's end (its pace sizes the held-out pass still to come)."""
        now = time.monotonic()
        if self._last is not None:
            self._step_seconds.append(now - self._last)
        self._last = now

    def step_started(self) -> None:
        if self._last is None:
            self._last = time.monotonic()

    def still_to_come(self) -> float:
        """Seconds the stage still needs after training: the reserved evaluation, the held-out pass at the
        training pace, and the save/register margin."""
        pace = sorted(self._step_seconds)[len(self._step_seconds) // 2] if self._step_seconds else 0.0
        heldout = pace * FORWARD_SHARE * self.heldout_rows / max(1, self.rows_per_step)
        return self.reserved + heldout + MARGIN_SECONDS

    def over(self) -> bool:
        """Whether training must stop now for the stage to end within its limit."""
        if not self.minutes:
            return False
        return self.elapsed() + self.still_to_come() > self.minutes * 60

    def describe(self) -> dict:
        return {"limit_minutes": self.minutes, "elapsed_seconds": round(self.elapsed(), 1),
                "reserved_seconds": round(self.still_to_come(), 1)}
