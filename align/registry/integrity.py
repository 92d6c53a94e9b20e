"""Whether the files of a registry entry or a checkpoint are whole, told without loading weights.

Why: a missing `adapter_config.json`, a missing adapter weights file or a truncated safetensors file used
to pass `align plan` and then crash a run, merge, export or score with a library traceback, and a
truncated file in the newest checkpoint blocked resuming. The cheap check reads sizes, small JSON files,
safetensors headers and zip directories (torch `.pt` files) only, so `align plan`, `align models list`
and every load can afford it; `align models verify` also hashes every file against what registration
recorded in the manifest's `files` (`record_files`).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from align.errors import AlignError, RegistryError
from align.registry.fingerprint import hash_file

FILES_KEY = "files"  # manifest key: {relative path: {"bytes": size, "hash": sha256 prefix}}
_SMALL_JSON = 1 << 20  # JSON files up to this size are parsed; bigger ones (tokenizer.json) are size-checked
_ZIP_MAGIC = b"PK\x03\x04"


# ------------------------------------------------------------------------------------------ one file


def file_problem(path: Path) -> str | None:
    """Why one file is not whole (missing, empty, truncated, unparsable), or None. Reads headers only."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    if path.suffix == ".safetensors":
        return safetensors_problem(path, size)
    if path.suffix in {".pt", ".pth", ".bin"}:
        return torch_file_problem(path)
    if path.suffix == ".json" and size <= _SMALL_JSON:
        try:
            json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as err:
            return f"not valid JSON ({err})"
    return None


def safetensors_problem(path: Path, size: int | None = None) -> str | None:
    """A safetensors file is whole when its header parses and its tensors end exactly at the end of the
    file (what the safetensors library demands on load); None then, else what is wrong."""
    size = path.stat().st_size if size is None else size
    if size < 8:
        return f"truncated: {size} bytes, shorter than a safetensors header"
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        if length > size - 8:
            return f"truncated: {size} bytes, its header alone claims {length + 8}"
        try:
            header = json.loads(handle.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as err:
            return f"unreadable safetensors header ({type(err).__name__}: {err})"
    expected = 8 + length + end
    if size < expected:
        return f"truncated: {size} bytes, its header says {expected}"
    if size > expected:
        return f"{size} bytes where its header says {expected} (damaged)"
    return None


def torch_file_problem(path: Path) -> str | None:
    """`torch.save` writes a zip archive whose directory is at its end: a truncated file has none. Files in
    the legacy pickle format are not zips and are only checked for being non-empty."""
    with open(path, "rb") as handle:
        if handle.read(4) != _ZIP_MAGIC:
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"truncated or damaged ({err})"
    return None


def folder_problems(folder: Path) -> list[str]:
    """Every damaged file under `folder`, as `relative/path: problem` (a checkpoint's, for instance)."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        why = file_problem(path)
        if why:
            found.append(f"{path.relative_to(folder)}: {why}")
    return found


# ------------------------------------------------------------------------------------------ entries


def record_files(folder: Path) -> dict[str, dict]:
    """Size and content hash of every file of a staged entry but its manifest, for the manifest's `files`:
    later damage is then named file by file, and `align models verify` can compare contents."""
    from align.registry.store import MANIFEST

    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "hash": hash_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def entry_problems(entry, full: bool = False) -> list[str]:
    """What is wrong with one entry's files ([] when whole): its artifact's required files, the tokenizer
    folder, the sizes recorded at registration (`full`: their hashes too) and every safetensors header."""
    headers = [f"{p.relative_to(entry.path)}: {why}" for p in sorted(entry.path.rglob("*.safetensors"))
               if (why := safetensors_problem(p))]
    problems, named = [], set()
    for problem in _artifact_problems(entry) + _tokenizer_problems(entry) + _recorded_problems(entry, full) + headers:
        file = problem.split(": ", 1)[0]
        if file not in named:  # one line per file, the first check that caught it
            named.add(file)
            problems.append(problem)
    return problems


def _artifact_problems(entry) -> list[str]:
    """The files without which the artifact cannot load: config and weights (an adapter's or a model's)."""
    artifact = entry.manifest.get("artifact") or {}
    if not artifact.get("path"):
        return []
    folder = entry.file(artifact["path"])
    if not folder.is_dir():
        return [f"{artifact['path']}/: missing ({artifact.get('type', 'artifact')} folder)"]
    config, weights = (("adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin"))
                       if artifact.get("type") == "adapter" else
                       ("config.json", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                        "pytorch_model.bin.index.json")))
    problems = []
    why = file_problem(folder / config)
    if why:
        problems.append(f"{artifact['path']}/{config}: {why}")
    present = [name for name in weights if (folder / name).is_file()]
    if not present:
        problems.append(f"{artifact['path']}/: no weights file (expected {' or '.join(weights)})")
    for name in present:
        why = file_problem(folder / name) or (_shards_problem(folder / name) if name.endswith(".index.json") else None)
        if why:
            problems.append(f"{artifact['path']}/{name}: {why}")
    return problems


def _shards_problem(index: Path) -> str | None:
    """A sharded checkpoint's index names shard files; each must be there."""
    shards = sorted(set((json.loads(index.read_text()).get("weight_map") or {}).values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    return f"shard {missing[0]} missing ({len(missing)} of {len(shards)})" if missing else None


def _tokenizer_problems(entry) -> list[str]:
    path = (entry.manifest.get("tokenizer") or {}).get("path")
    if not path:
        return []
    folder = entry.file(path)
    if not folder.is_dir():
        return [f"{path}/: missing (tokenizer folder)"]
    if not any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        return [f"{path}/: no tokenizer_config.json or tokenizer.json"]
    return []


def _recorded_problems(entry, full: bool) -> list[str]:
    """Files recorded at registration that are gone, changed size or (with `full`) changed content."""
    problems = []
    for rel, facts in sorted((entry.manifest.get(FILES_KEY) or {}).items()):
        path = entry.file(rel)
        if not path.is_file():
            problems.append(f"{rel}: missing (recorded at registration, {facts.get('bytes')} bytes)")
        elif facts.get("bytes") is not None and path.stat().st_size != facts["bytes"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, registered with {facts['bytes']}")
        elif full and facts.get("hash") and hash_file(path) != facts["hash"]:
            problems.append(f"{rel}: content changed since registration (hash {hash_file(path)}, "
                            f"registered {facts['hash']})")
    return problems


def source_problems(source, registry, full: bool = False) -> list[str]:
    """An entry's problems and those of every entry its adapter chain applies to, each named by its ref."""
    problems, entry = [], source.entry
    for _ in range(16):  # adapter on adapter ... on full weights
        if entry is None:
            break
        problems += [f"{entry.ref}: {p}" for p in entry_problems(entry, full)]
        target = (entry.artifact.get("applies_to") or {}) if entry.artifact.get("type") == "adapter" else {}
        if target.get("source") != "registry":
            break
        try:
            parent = registry.find(target["ref"])
        except AlignError as err:  # its manifest is unreadable
            problems.append(f"{entry.ref}: applies to {target['ref']}: {err}")
            break
        if parent is None:
            problems.append(f"{entry.ref}: applies to {target['ref']}, which is not in registry {registry.root}")
        entry = parent
    return problems


def require_whole(source, registry) -> None:
    """Raise `RegistryError` naming the entry, file and problem when a source's files are damaged, before
    anything loads them."""
    problems = source_problems(source, registry)
    if problems:
        entry = source.entry
        raise RegistryError(f"{entry.ref} ({entry.path}) cannot be used, its files are damaged:\n"
                            + "\n".join(f"  - {p}" for p in problems)
                            + "\nRestore the folder, or run the stage that made it again.")
