"""JSON files that stay whole: written through a temporary file, fsync and rename, read back with the
damage named. The registry's manifests and the records a run folder keeps (`registered.json`, ...) use them.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from align.errors import RegistryError
from align.runtime.diskspace import disk_guard


def read_json_record(path: Path) -> dict | None:
    """A JSON object a run folder keeps (`registered.json`, `continues.json`), or None when the file is
    missing, unreadable or not an object: such records are hints, and their absence means "not recorded"."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file in the same folder, fsync, then rename over the target: the old
    file stays whole whatever happens, and a full disk is a `DiskFullError` naming the file."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with disk_guard(path, lambda: len(text.encode()), f"{path} is unchanged."):
            with open(tmp, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_manifest(path: Path) -> dict:
    """A manifest's JSON; a `RegistryError` naming the file when it does not read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RegistryError(f"{path}: unreadable manifest ({err})") from None


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: a folder that cannot be opened is skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
