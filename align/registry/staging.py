"""Staging folders: where an entry is written before its one `rename(2)` into the registry.

Each writer holds an flock(2) on `<uuid>.lock` beside its folder for as long as it lives; the kernel drops
the lock when the process dies, so a folder whose lock nobody holds was left by a crash and is removed
(`clean_staging`) by the next writer.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

UNLOCKED_STAGING_SECONDS = 24 * 3600  # a staging folder without a lock file (older align) is stale after this


def claim_staging(registry_root: Path) -> tuple[Path, int]:
    """A new staging folder and the descriptor of its lock file, flock(2)ed for as long as this process
    writes the entry: the kernel drops the lock when the process dies, which is how `clean_staging`
    tells a crashed writer's folder from a live one's."""
    root = registry_root / ".staging"
    root.mkdir(parents=True, exist_ok=True)
    while True:
        name = uuid.uuid4().hex
        lock = root / f"{name}.lock"
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:  # not swept in between
            break
        os.close(fd)
    staging = root / name
    staging.mkdir()
    return staging, fd


def clean_staging(registry_root: Path) -> list[Path]:
    """Remove the staging folders of writers that crashed (a crash during commit used to leak a whole
    entry each time): those whose lock no live process holds, and lock-less ones (written by an older
    align) untouched for a day. Returns what was removed."""
    root = registry_root / ".staging"
    if not root.is_dir():
        return []
    removed = []
    for child in sorted(root.iterdir()):
        if child.suffix == ".lock":
            if not (root / child.stem).exists():
                remove_unowned(None, child)  # a lock whose folder is gone
            continue
        lock = root / f"{child.name}.lock"
        if lock.exists():
            stale = remove_unowned(child, lock)
        else:
            stale = time.time() - child.stat().st_mtime > UNLOCKED_STAGING_SECONDS
            if stale:
                shutil.rmtree(child, ignore_errors=True)
        if stale:
            log.info("removed %s, left by a registry write that did not finish", child)
            removed.append(child)
    return removed


def release_staging(staging: Path, fd: int) -> None:
    """The writer is done with its staging folder (committed or failed): drop the lock file, then the lock."""
    (staging.parent / f"{staging.name}.lock").unlink(missing_ok=True)
    os.close(fd)


def remove_unowned(folder: Path | None, lock: Path) -> bool:
    """Remove a staging folder and its lock file if no live process holds the lock; True if removed."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer is alive
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        lock.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def tree_bytes(folder: Path) -> int:
    """What a staging folder holds so far, in bytes (for a full disk's message)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
