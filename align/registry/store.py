"""Model registry: every stage output is a named, versioned entry with its lineage.

Layout on disk (root defaults to `./registry`, or `$ALIGN_REGISTRY`, or the recipe's `registry:`):

    registry/
      .lock                      flock(2) target: version numbers are handed out under it
      .staging/<uuid>/           entries being written; never listed
      .staging/<uuid>.lock       flock(2)ed by the writer while it lives: a folder whose lock nobody holds
                                 was left by a crash and is removed by the next `create` (`clean_staging`)
      quickstart/sft/v1/         one complete entry
        manifest.json            name, version, kind, lineage, hashes, config, metrics, versions
        adapter/ | model/        the artifact (LoRA adapter or full weights)
        tokenizer/               tokenizer files with the chat template

An entry is built in `.staging/` and moved into place with one `rename(2)`, which is atomic on POSIX:
a crash at any point leaves either the previous versions untouched or a complete new one, never half
an entry. Version numbers are taken under a file lock, so two processes writing the same name at once
get distinct versions. Manifest updates after creation (metrics, gate status) go through a temporary
file and `os.replace`. Each manifest records the size and hash of every file of its entry (`files`), so
damage is named later (`align.registry.integrity`); a full disk is a `DiskFullError` naming the path, never a
half-written entry. Staging folders and their locks are `align.registry.staging`; JSON written atomically
is `align.registry.records`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import fcntl
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from align.errors import RegistryError
from align.registry.integrity import FILES_KEY, record_files
from align.registry.records import fsync_dir, read_manifest, write_json_atomic
from align.registry.staging import claim_staging, clean_staging, release_staging, tree_bytes
from align.runtime.diskspace import disk_guard

MANIFEST = "manifest.json"
REMOVED = "removed.json"  # left in a removed version's folder, so its number is never reused
SCHEMA_VERSION = 1
ENTRY_KINDS = ("base", "policy", "reward", "merged", "exported")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$")
_REF = re.compile(r"^(?P<name>[^@]+?)(@(?P<version>v?\d+))?$")


def default_root() -> Path:
    return Path(os.environ.get("ALIGN_REGISTRY", "registry"))


@dataclass(frozen=True)
class Entry:
    """A complete registry entry (its directory and its manifest)."""

    name: str
    version: int
    path: Path
    manifest: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def artifact(self) -> dict:
        return self.manifest.get("artifact", {})

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`quickstart/sft` -> (name, None = latest); `quickstart/sft@2` -> (name, 2)."""
    match = _REF.match(ref.strip())
    if not match:
        raise RegistryError(f"{ref!r} is not a registry reference (expected NAME or NAME@VERSION)")
    version = match.group("version")
    return match.group("name"), int(version.lstrip("v")) if version else None


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise RegistryError(f"invalid entry name {name!r}: use lowercase letters, digits, '.', '_', '-' and '/'")
    if any(re.fullmatch(r"v\d+", part) for part in name.split("/")):
        raise RegistryError(f"invalid entry name {name!r}: a part like 'v1' would be read as a version folder")
    return name


class Registry:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    # ------------------------------------------------------------------------------------- reading

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            if re.fullmatch(r"v\d+", child.name) and (child / MANIFEST).is_file():
                found.append(int(child.name[1:]))
        return sorted(found)

    def find(self, ref: str) -> Entry | None:
        """The entry a ref names, or None. A ref without version means the latest version."""
        try:
            name, version = parse_ref(ref)
        except RegistryError:
            return None
        if not _NAME.match(name):
            return None
        versions = self.versions(name)
        if not versions:
            return None
        version = versions[-1] if version is None else version
        if version not in versions:
            return None
        path = self.root / name / f"v{version}"
        return Entry(name=name, version=version, path=path, manifest=read_manifest(path / MANIFEST))

    def resolve(self, ref: str) -> Entry:
        entry = self.find(ref)
        if entry is not None:
            return entry
        name, version = parse_ref(ref)
        removed = self.removed_record(name, version)
        if removed is not None:
            raise RegistryError(f"{ref}: {removed['ref']} was removed from registry {self.root} on {removed['removed']}")
        if version is not None and self.versions(name):
            raise RegistryError(f"{ref}: no version {version} of {name} (has {', '.join(map(str, self.versions(name)))})")
        names = [e.name for e in self.list()]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RegistryError(f"{ref}: no such entry in registry {self.root}{hint}")

    def list(self) -> list[Entry]:
        """Every entry whose manifest reads; `scan` also names the ones that do not."""
        return self.scan()[0]

    def scan(self) -> tuple[list[Entry], list[tuple[str, Path, str]]]:
        """(entries, unreadable) where unreadable holds (ref, manifest path, why) for each version folder whose
        manifest does not parse: one damaged manifest must not hide the rest of the registry."""
        entries, unreadable = [], []
        if not self.root.is_dir():
            return entries, unreadable
        for manifest in sorted(self.root.rglob(MANIFEST)):
            rel = manifest.parent.relative_to(self.root)
            if rel.parts and rel.parts[0].startswith("."):
                continue
            if not re.fullmatch(r"v\d+", rel.name):
                continue
            name, version = str(rel.parent), int(rel.name[1:])
            try:
                data = read_manifest(manifest)
            except RegistryError as err:
                unreadable.append((f"{name}@{version}", manifest, str(err).split(": ", 1)[-1]))
                continue
            entries.append(Entry(name=name, version=version, path=manifest.parent, manifest=data))
        return entries, unreadable

    def namespaces(self) -> set[str]:
        return {e.name.split("/")[0] for e in self.list()}

    # ------------------------------------------------------------------------------------- writing

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def create(self, name: str, kind: str) -> Iterator["EntryDraft"]:
        """Build an entry in a staging folder; it appears in the registry only if the block completes.

        Usage: `with registry.create("quickstart/sft", "policy") as draft: save into draft.path; draft.manifest[...] = ...`
        and then `draft.entry` is the committed entry.
        """
        validate_name(name)
        if kind not in ENTRY_KINDS:
            raise RegistryError(f"unknown entry kind {kind!r}; expected one of {', '.join(ENTRY_KINDS)}")
        self.clean_staging()
        staging, lock = claim_staging(self.root)
        draft = EntryDraft(name=name, kind=kind, path=staging, manifest={})
        safe = f"Nothing of {name} was registered; the registry's entries are untouched."
        try:
            with disk_guard(staging, lambda: draft.expected_bytes, safe, written=lambda: tree_bytes(staging)):
                yield draft
                draft.manifest.setdefault(FILES_KEY, record_files(staging))
                draft.entry = self._commit(draft)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
            release_staging(staging, lock)

    def clean_staging(self) -> list[Path]:
        """Remove the staging folders of writers that crashed (`align.registry.staging.clean_staging`);
        returns what was removed."""
        return clean_staging(self.root)

    def _commit(self, draft: "EntryDraft") -> Entry:
        with self.lock():
            version = self._next_version(draft.name)
            target = self.root / draft.name / f"v{version}"
            manifest = {
                "schema": SCHEMA_VERSION,
                "name": draft.name,
                "version": version,
                "ref": f"{draft.name}@{version}",
                "kind": draft.kind,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **draft.manifest,
            }
            write_json_atomic(draft.path / MANIFEST, manifest)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(draft.path, target)
            fsync_dir(target.parent)
        return Entry(name=draft.name, version=version, path=target, manifest=manifest)

    def _next_version(self, name: str) -> int:
        """One past every version folder, complete or not: a stray folder is never written into."""
        folder = self.root / name
        taken = [int(c.name[1:]) for c in folder.iterdir() if re.fullmatch(r"v\d+", c.name)] if folder.is_dir() else []
        return max(taken, default=0) + 1

    def update(self, entry: Entry, **changes: Any) -> Entry:
        """Merge top-level keys into an entry's manifest, atomically (metrics, gate status, evaluations)."""
        with self.lock():
            manifest = read_manifest(entry.path / MANIFEST)
            for key, value in changes.items():
                if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                    manifest[key] = {**manifest[key], **value}
                else:
                    manifest[key] = value
            write_json_atomic(entry.path / MANIFEST, manifest)
        return Entry(entry.name, entry.version, entry.path, manifest)

    # ------------------------------------------------------------------------------------- removing

    def dependents(self, entry: Entry) -> list[Entry]:
        """The other entries whose manifest names `entry` by ref: as parent, base, the model an adapter applies
        to, a merge's source, a PPO reward model. Removing it would leave their lineage pointing at nothing
        (and an adapter on it without the weights it applies to)."""
        return [other for other in self.list() if other.ref != entry.ref and entry.ref in _refs_in(other.manifest)]

    def remove(self, ref: str, force: bool = False) -> tuple[Entry, list[Entry]]:
        """Remove one entry; returns it with the entries that named it. Refused while other entries name it
        unless `force`. All or nothing: under the registry lock the version folder leaves the registry with
        one `rename(2)` (into `.staging/`, deleted after), and a `removed.json` in its place keeps the version
        number from being handed out again, so a ref recorded in some lineage never names a different entry."""
        with self.lock():
            entry = self.resolve(ref)
            dependents = self.dependents(entry)
            if dependents and not force:
                names = ", ".join(d.ref for d in dependents[:6]) + (" ..." if len(dependents) > 6 else "")
                raise RegistryError(f"{entry.ref}: {len(dependents)} other entr{'y names' if len(dependents) == 1 else 'ies name'}"
                                    f" it ({names}); remove those first, or pass --force to remove it anyway "
                                    "(their lineage would then point at a removed entry)")
            trash = self.root / ".staging" / f"{uuid.uuid4().hex}.removed"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(entry.path, trash)
            entry.path.mkdir()
            write_json_atomic(entry.path / REMOVED, {"ref": entry.ref, "kind": entry.kind,
                                                     "removed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                                     "dependents": [d.ref for d in dependents]})
            fsync_dir(entry.path.parent)
        shutil.rmtree(trash, ignore_errors=True)
        return entry, dependents

    def removed_record(self, name: str, version: int | None) -> dict | None:
        """What `removed.json` says of a removed version (the newest removed one when `version` is None and no
        version of `name` is left), or None."""
        if not _NAME.match(name):
            return None
        if version is None:
            if self.versions(name):
                return None
            folder = self.root / name
            marks = sorted(folder.glob(f"v*/{REMOVED}"), key=lambda p: int(p.parent.name[1:])) if folder.is_dir() else []
            path = marks[-1] if marks else None
        else:
            path = self.root / name / f"v{version}" / REMOVED
        try:
            return json.loads(path.read_text()) if path is not None else None
        except (OSError, ValueError):
            return None


def _refs_in(value: Any) -> set[str]:
    """Every string anywhere in a manifest (refs are `name@version` strings)."""
    if isinstance(value, dict):
        return set().union(*(_refs_in(v) for k, v in value.items() if k != "history"))
    if isinstance(value, list):
        return set().union(*(_refs_in(v) for v in value)) if value else set()
    return {value} if isinstance(value, str) else set()


@dataclass
class EntryDraft:
    name: str
    kind: str
    path: Path
    manifest: dict
    entry: Entry | None = None
    expected_bytes: int | None = None  # what the entry will take on disk, if the writer knows (for a full disk)
