"""A full disk, told as such: which path could not be written, how much it needs, how much is free.

Why: a checkpoint save or a registry write on a full disk ended in a raw `OSError: [Errno 28]` (or a
library's own wording of it: safetensors' `StorageFull`, torch's "file write failed") with a traceback.
`disk_guard` turns those into one `DiskFullError`; what was safe before (complete checkpoints, registry
entries, manifests) is never touched by the failed write, which goes to a temporary or staging place.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Callable, Iterator

from align.errors import AlignError, DiskFullError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_WORDS = ("no space left on device", "storagefull", "os error 28", "errno 28", "disk quota exceeded")
_TORCH_WRITE_FAILED = ("file write failed", "unexpected pos")  # torch's zip writer loses the errno


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(err: BaseException, path: Path | None = None, needed: int | None = None) -> bool:
    """Whether `err` means the disk (or quota) is full. torch's writer drops the errno, so its failure counts
    when the free space at `path` is below what the write needs."""
    if isinstance(err, AlignError):
        return False
    if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
        return True
    text = str(err).lower()
    if any(word in text for word in _FULL_WORDS):
        return True
    if path is not None and any(word in text for word in _TORCH_WRITE_FAILED):
        free = free_bytes(path)
        return free is not None and free < max(needed or 0, 1 << 20)
    return False


def disk_full_error(path: Path, needed: int | None, safe: str, err: BaseException | None = None,
                    written: int | None = None) -> DiskFullError:
    """The error a user sees: the path, the space needed (or at least what was written before the disk
    filled) and free, and what is still safe."""
    target = Path(getattr(err, "filename", None) or path)
    free = free_bytes(target)
    if needed:
        need = f"needs about {human_bytes(needed)}"
    elif written:
        need = f"needs more than the {human_bytes(written)} written before the disk filled"
    else:
        need = "needs more space"
    have = f", {human_bytes(free)} free there" if free is not None else ""
    parts = [f"no space left on device writing {target}: it {need}{have}.", safe,
             "Free some space and run the same command again."]
    return DiskFullError(" ".join(p for p in parts if p))


@contextlib.contextmanager
def disk_guard(path: Path, needed: Callable[[], int | None] = lambda: None, safe: str | Callable[[], str] = "",
               written: Callable[[], int | None] = lambda: None) -> Iterator[None]:
    """Run a write; a full disk inside becomes `DiskFullError` naming `path` (or the file the OS named),
    `needed()` bytes (else `written()`, a lower bound), the free space and what is `safe` (text, or a
    callable asked only then). Other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        need = _safely(needed)
        if not is_disk_full(err, path, need):
            raise
        told = safe() if callable(safe) else safe
        raise disk_full_error(path, need, told, err, None if need else _safely(written)) from err


def _safely(needed: Callable[[], int | None]) -> int | None:
    """The estimate of the space needed; an estimate that fails is no estimate (never a second error)."""
    try:
        return needed()
    except Exception:  # noqa: BLE001 - a best-effort figure for a message
        return None
