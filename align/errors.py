"""Errors a user can act on.

Every error the user sees names the place of the problem (file, YAML key path, row index) so it can be
fixed without reading a traceback. `ConfigError` carries *all* problems found at once: validation never
stops at the first one, because fixing a recipe one error per run wastes the user's time.
"""

from __future__ import annotations

from dataclasses import dataclass


class AlignError(Exception):
    """Base class: the CLI prints these as a message (no traceback) and exits non-zero."""


@dataclass(frozen=True)
class Problem:
    """One problem at one place: `where` is a YAML path (`stages.sft.lr`), a file, or `file:row N`."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ConfigError(AlignError):
    """One or more problems in a recipe, its files or its model references, all reported together."""

    def __init__(self, problems: list[Problem], source: str | None = None, partial=None):
        self.problems = list(problems)
        self.source = source
        self.partial = partial  # the recipe as far as it validated, for the plan's checks (`align.config.recipe`)
        head = f"{source}: " if source else ""
        count = len(self.problems)
        lines = [f"{head}{count} problem{'s' if count != 1 else ''} found"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def byte_place(data: bytes, offset: int) -> tuple[int, int]:
    """(line, column), both from 1, of byte `offset` in `data`: an undecodable byte named where an editor
    shows it, rather than by its offset."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


class DataError(AlignError):
    """A data file or rows in it cannot be used; the message names the file and the rows."""


class RegistryError(AlignError):
    """A registry reference does not resolve, or an entry is not what the caller needs."""


class TrainingError(AlignError):
    """Training cannot go on (non-finite loss, refused resume); says at which step and why."""


class ExportError(AlignError):
    """A merge or export was refused (quantized weights, unsupported model) or failed its verification;
    the message says what to do instead. Nothing half-written is left behind."""


class DiskFullError(AlignError):
    """A write failed for lack of space; the message names the path, the space needed and free, and says
    what is still safe (complete checkpoints and entries are never touched by a failed write)."""
