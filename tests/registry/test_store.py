from __future__ import annotations

import errno
import json
import multiprocessing
import os
import time

import pytest

import align.registry.store
from align.errors import RegistryError
from align.registry.store import MANIFEST, Registry, parse_ref


def make_entry(registry: Registry, name: str = "quickstart/sft", kind: str = "policy", **manifest):
    with registry.create(name, kind) as draft:
        (draft.path / "adapter").mkdir()
        (draft.path / "adapter" / "weights.bin").write_bytes(b"\x00" * 16)
        draft.manifest.update(manifest)
    return draft.entry


def staging_leftovers(registry: Registry) -> list:
    staging = registry.root / ".staging"
    return list(staging.iterdir()) if staging.exists() else []


def test_parse_ref():
    assert parse_ref("a/b") == ("a/b", None)
    assert parse_ref("a/b@2") == ("a/b", 2)
    assert parse_ref("a/b@v3") == ("a/b", 3)


def test_create_list_and_resolve(tmp_registry):
    entry = make_entry(tmp_registry, metrics={"loss": 1.5})
    assert entry.version == 1
    assert entry.ref == "quickstart/sft@1"
    assert (entry.path / MANIFEST).is_file()
    assert (entry.path / "adapter" / "weights.bin").is_file()
    assert entry.manifest["kind"] == "policy"
    assert entry.manifest["metrics"] == {"loss": 1.5}

    listed = tmp_registry.list()
    assert [(e.name, e.version) for e in listed] == [("quickstart/sft", 1)]
    for ref in ("quickstart/sft", "quickstart/sft@1", "quickstart/sft@v1"):
        found = tmp_registry.resolve(ref)
        assert (found.name, found.version, found.path) == ("quickstart/sft", 1, entry.path)
        assert found.manifest["ref"] == "quickstart/sft@1"
    assert staging_leftovers(tmp_registry) == []


def test_second_create_is_version_two_and_latest(tmp_registry):
    first = make_entry(tmp_registry)
    second = make_entry(tmp_registry)
    assert (first.version, second.version) == (1, 2)
    assert tmp_registry.versions("quickstart/sft") == [1, 2]
    assert tmp_registry.resolve("quickstart/sft").version == 2
    assert tmp_registry.resolve("quickstart/sft@1").path == first.path
    assert sorted(e.version for e in tmp_registry.list()) == [1, 2]


def test_unknown_ref_suggests_close_name(tmp_registry):
    make_entry(tmp_registry)
    with pytest.raises(RegistryError) as info:
        tmp_registry.resolve("quickstart/stf")
    message = str(info.value)
    assert "quickstart/stf" in message
    assert "did you mean" in message and "quickstart/sft" in message
    assert tmp_registry.find("quickstart/stf") is None


def test_unknown_version_names_existing_versions(tmp_registry):
    make_entry(tmp_registry)
    with pytest.raises(RegistryError) as info:
        tmp_registry.resolve("quickstart/sft@5")
    assert "no version 5" in str(info.value)
    assert "has 1" in str(info.value)


def test_invalid_name_and_kind_rejected(tmp_registry):
    with pytest.raises(RegistryError):
        with tmp_registry.create("Bad Name", "policy"):
            pass
    with pytest.raises(RegistryError):
        with tmp_registry.create("ok", "nonsense"):
            pass
    assert tmp_registry.list() == []


def test_exception_inside_create_leaves_nothing(tmp_registry):
    with pytest.raises(RuntimeError, match="boom"):
        with tmp_registry.create("quickstart/sft", "policy") as draft:
            (draft.path / "adapter").mkdir()
            (draft.path / "adapter" / "weights.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert draft.entry is None
    assert not (tmp_registry.root / "quickstart" / "sft" / "v1").exists()
    assert tmp_registry.versions("quickstart/sft") == []
    assert tmp_registry.list() == []
    assert staging_leftovers(tmp_registry) == []


def test_crash_before_commit_rename_keeps_previous_versions(tmp_registry, monkeypatch):
    first = make_entry(tmp_registry, metrics={"loss": 1.0})
    before = [(e.name, e.version, e.manifest) for e in tmp_registry.list()]

    def crash(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(align.registry.store.os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        with tmp_registry.create("quickstart/sft", "policy") as draft:
            (draft.path / "adapter").mkdir()
            (draft.path / "adapter" / "weights.bin").write_bytes(b"new")
    monkeypatch.undo()

    assert [(e.name, e.version, e.manifest) for e in tmp_registry.list()] == before
    assert tmp_registry.versions("quickstart/sft") == [1]
    assert not (tmp_registry.root / "quickstart" / "sft" / "v2").exists()
    assert (first.path / "adapter" / "weights.bin").read_bytes() == b"\x00" * 16
    assert tmp_registry.resolve("quickstart/sft").version == 1
    assert staging_leftovers(tmp_registry) == []
    # the registry still works afterwards and the lost attempt did not burn a version number
    assert make_entry(tmp_registry).version == 2


def test_update_merges_keys(tmp_registry):
    entry = make_entry(tmp_registry, metrics={"loss": 1.0}, gate="pending")
    updated = tmp_registry.update(entry, metrics={"accuracy": 0.7}, gate="passed", evals=[1, 2])
    on_disk = json.loads((entry.path / MANIFEST).read_text())
    assert on_disk["metrics"] == {"loss": 1.0, "accuracy": 0.7}
    assert on_disk["gate"] == "passed"
    assert on_disk["evals"] == [1, 2]
    assert on_disk["name"] == "quickstart/sft" and on_disk["version"] == 1
    assert updated.manifest == on_disk
    assert tmp_registry.resolve("quickstart/sft").manifest == on_disk
    # only the manifest and the artifact are in the entry folder: no temporary files left
    assert sorted(p.name for p in entry.path.iterdir()) == ["adapter", MANIFEST]


def test_update_failure_leaves_manifest_intact(tmp_registry, monkeypatch):
    entry = make_entry(tmp_registry, metrics={"loss": 1.0})
    original = (entry.path / MANIFEST).read_text()

    def crash(src, dst):
        raise OSError("simulated crash during replace")

    monkeypatch.setattr(align.registry.store.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        tmp_registry.update(entry, metrics={"accuracy": 0.1})
    monkeypatch.undo()
    assert (entry.path / MANIFEST).read_text() == original
    assert tmp_registry.resolve("quickstart/sft").manifest["metrics"] == {"loss": 1.0}


def _create_in_process(root, barrier, queue):
    registry = Registry(root)
    barrier.wait(timeout=30)
    with registry.create("race/sft", "policy") as draft:
        (draft.path / "payload.txt").write_text(str(multiprocessing.current_process().pid))
        time.sleep(0.2)  # widen the window in which both drafts exist
    queue.put(draft.entry.version)


def test_concurrent_creates_get_distinct_versions(tmp_path):
    root = tmp_path / "registry"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_create_in_process, args=(str(root), barrier, queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    versions = sorted(queue.get(timeout=5) for _ in procs)
    assert versions == [1, 2]

    registry = Registry(root)
    assert registry.versions("race/sft") == [1, 2]
    payloads = set()
    for version in (1, 2):
        path = root / "race" / "sft" / f"v{version}"
        manifest = json.loads((path / MANIFEST).read_text())
        assert manifest["version"] == version
        assert manifest["ref"] == f"race/sft@{version}"
        payloads.add((path / "payload.txt").read_text())
    assert len(payloads) == 2  # each version holds a different process's content
    assert sorted(e.version for e in registry.list()) == [1, 2]
    assert staging_leftovers(registry) == []


def test_stray_version_dir_without_manifest_is_ignored(tmp_registry):
    make_entry(tmp_registry)
    stray = tmp_registry.root / "quickstart" / "sft" / "v9"
    stray.mkdir(parents=True)
    (stray / "adapter").mkdir()
    assert tmp_registry.versions("quickstart/sft") == [1]
    assert [e.version for e in tmp_registry.list()] == [1]
    assert tmp_registry.resolve("quickstart/sft").version == 1
    assert tmp_registry.find("quickstart/sft@9") is None
    with pytest.raises(RegistryError):
        tmp_registry.resolve("quickstart/sft@v9")
    # a name made only of a stray folder is not an entry at all
    (tmp_registry.root / "ghost" / "v1").mkdir(parents=True)
    assert tmp_registry.find("ghost") is None
    assert "ghost" not in {e.name for e in tmp_registry.list()}


def test_staging_is_never_listed(tmp_registry):
    make_entry(tmp_registry)
    fake = tmp_registry.root / ".staging" / "abc" / "x" / "v1"
    fake.mkdir(parents=True)
    (fake / MANIFEST).write_text(json.dumps({"kind": "policy"}))
    assert [e.name for e in tmp_registry.list()] == ["quickstart/sft"]


def test_name_with_version_like_component_does_not_collide(tmp_registry):
    try:
        make_entry(tmp_registry, name="x/v1")
    except RegistryError:
        return  # rejecting such names is an acceptable fix
    entry = make_entry(tmp_registry, name="x")
    assert entry.version == 1
    assert {(e.name, e.version) for e in tmp_registry.list()} == {("x/v1", 1), ("x", 1)}


def test_stray_non_empty_version_dir_does_not_break_create(tmp_registry):
    make_entry(tmp_registry)
    stray = tmp_registry.root / "quickstart" / "sft" / "v2"
    stray.mkdir()
    (stray / "leftover.bin").write_bytes(b"x")
    entry = make_entry(tmp_registry)
    assert entry.version >= 2
    assert tmp_registry.resolve("quickstart/sft").path == entry.path


# ------------------------------------------------------------------------------------------ damaged manifests


def test_a_corrupt_manifest_hides_only_its_own_entry(tmp_registry, capsys):
    from align.cli.main import main

    good = make_entry(tmp_registry, name="quickstart/sft")
    bad = make_entry(tmp_registry, name="quickstart/dpo")
    (bad.path / MANIFEST).write_text('{"name": "quickstart/dpo", "kind": ')  # cut short
    assert [e.ref for e in tmp_registry.list()] == [good.ref]
    entries, unreadable = tmp_registry.scan()
    assert [e.ref for e in entries] == [good.ref]
    assert [(ref, path) for ref, path, _ in unreadable] == [(bad.ref, bad.path / MANIFEST)]
    assert tmp_registry.resolve("quickstart/sft").ref == good.ref
    with pytest.raises(RegistryError, match="did you mean quickstart/sft"):
        tmp_registry.resolve("quickstart/sfx")
    with pytest.raises(RegistryError, match=r"quickstart/dpo/v1/manifest.json: unreadable manifest"):
        tmp_registry.resolve("quickstart/dpo")

    assert main(["--registry", str(tmp_registry.root), "models", "list"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert any(line.startswith(good.ref) and " ok " in line for line in out.splitlines()), out
    bad_line = next(line for line in out.splitlines() if line.startswith(bad.ref))
    assert "UNREADABLE" in bad_line and str(bad.path / MANIFEST) in bad_line and "unreadable manifest" in bad_line


# ------------------------------------------------------------------------------------------ stale staging


def _crash_during_commit(root):
    """A writer killed between writing its staged entry and renaming it into place (no cleanup runs)."""
    registry = Registry(root)
    align.registry.store.os.rename = lambda src, dst: os._exit(1)  # this child process only
    with registry.create("quickstart/sft", "policy") as draft:
        (draft.path / "adapter").mkdir()
        (draft.path / "adapter" / "weights.bin").write_bytes(b"\x00" * 4096)


def _write_slowly(root, started, release, queue):
    registry = Registry(root)
    with registry.create("quickstart/sft", "policy") as draft:
        (draft.path / "payload.txt").write_text("live")
        started.set()
        release.wait(timeout=30)
    queue.put(draft.entry.version)


def test_stale_staging_of_a_crashed_writer_is_cleaned_and_a_live_writers_is_not(tmp_path):
    root = tmp_path / "registry"
    ctx = multiprocessing.get_context("fork")
    crashed = ctx.Process(target=_crash_during_commit, args=(str(root),))
    crashed.start()
    crashed.join(timeout=60)
    assert crashed.exitcode == 1
    registry = Registry(root)
    leaked = [p for p in staging_leftovers(registry) if p.is_dir()]
    assert len(leaked) == 1 and (leaked[0] / "adapter" / "weights.bin").is_file()  # what used to stay forever

    started, release, queue = ctx.Event(), ctx.Event(), ctx.Queue()
    live = ctx.Process(target=_write_slowly, args=(str(root), started, release, queue))
    live.start()
    assert started.wait(timeout=30)
    old = root / ".staging" / ("0" * 32)  # lock-less, from an older align: stale once a day old
    old.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    young = root / ".staging" / ("1" * 32)
    young.mkdir()

    assert not leaked[0].exists()  # the next writer cleaned it as it started
    assert registry.clean_staging() == [old]
    remaining = {p.name for p in staging_leftovers(registry)}
    assert young.name in remaining and len([n for n in remaining if not n.endswith(".lock")]) == 2  # live + young
    assert make_entry(registry).version == 1  # a create cleans too, and the live draft is untouched
    release.set()
    live.join(timeout=60)
    assert live.exitcode == 0 and queue.get(timeout=5) == 2
    assert (root / "quickstart" / "sft" / "v2" / "payload.txt").read_text() == "live"
    assert {p.name for p in staging_leftovers(registry)} == {young.name}


# ------------------------------------------------------------------------------------------ full disk


def _enospc(path=None):
    """What the OS raises on a full disk (with the file's name when the call had one)."""
    if path is None:
        return OSError(errno.ENOSPC, "No space left on device")
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_while_writing_an_entry_is_one_clear_error_and_loses_nothing(tmp_registry):
    from align.errors import DiskFullError

    first = make_entry(tmp_registry, metrics={"loss": 1.0})
    before = [(e.ref, e.manifest) for e in tmp_registry.list()]
    with pytest.raises(DiskFullError) as info:
        with tmp_registry.create("quickstart/sft", "policy") as draft:
            draft.expected_bytes = 3 * 2**20
            (draft.path / "adapter").mkdir()
            (draft.path / "adapter" / "weights.bin").write_bytes(b"x" * 2048)
            raise _enospc(draft.path / "adapter" / "more.bin")
    message = str(info.value)
    assert "no space left on device writing" in message and "adapter/more.bin" in message
    assert "needs about 3.0 MB" in message and "free there" in message
    assert "Nothing of quickstart/sft was registered" in message
    assert [(e.ref, e.manifest) for e in tmp_registry.list()] == before
    assert (first.path / "adapter" / "weights.bin").read_bytes() == b"\x00" * 16
    assert staging_leftovers(tmp_registry) == []


def test_a_full_disk_while_updating_a_manifest_leaves_it_intact(tmp_registry, monkeypatch):
    from align.errors import DiskFullError

    entry = make_entry(tmp_registry, metrics={"loss": 1.0})
    original = (entry.path / MANIFEST).read_text()

    def full(fd):
        raise _enospc()

    monkeypatch.setattr(align.registry.store.os, "fsync", full)
    with pytest.raises(DiskFullError, match=rf"writing {entry.path / MANIFEST}: it needs about \d+ B.*unchanged"):
        tmp_registry.update(entry, metrics={"accuracy": 0.1})
    monkeypatch.undo()
    assert (entry.path / MANIFEST).read_text() == original
    assert sorted(p.name for p in entry.path.iterdir()) == ["adapter", MANIFEST]


# ------------------------------------------------------------------------------------------ removing


def _lineage_chain(registry: Registry):
    base = make_entry(registry, "base-model", "base")
    sft = make_entry(registry, "quickstart/sft", parent={"source": "registry", "ref": base.ref},
                     base={"source": "registry", "ref": base.ref})
    dpo = make_entry(registry, "quickstart/dpo", parent={"source": "registry", "ref": sft.ref},
                     artifact={"type": "adapter", "path": "adapter", "applies_to": {"source": "registry", "ref": sft.ref}})
    return base, sft, dpo


def test_remove_refuses_an_entry_others_descend_from_and_changes_nothing(tmp_path):
    registry = Registry(tmp_path / "r")
    base, sft, dpo = _lineage_chain(registry)
    with pytest.raises(RegistryError, match=r"quickstart/sft@1: 1 other entry names it \(quickstart/dpo@1\).*--force"):
        registry.remove("quickstart/sft@1")
    assert [e.ref for e in registry.list()] == ["base-model@1", "quickstart/dpo@1", "quickstart/sft@1"]
    assert registry.dependents(base) == [sft]


def test_remove_a_leaf_takes_the_whole_entry_and_never_reuses_its_version(tmp_path):
    registry = Registry(tmp_path / "r")
    _, sft, dpo = _lineage_chain(registry)
    removed, dependents = registry.remove("quickstart/dpo")
    assert removed.ref == "quickstart/dpo@1" and dependents == []
    assert registry.find("quickstart/dpo@1") is None
    assert not (dpo.path / MANIFEST).exists() and not (dpo.path / "adapter").exists()
    assert staging_leftovers(registry) == []
    with pytest.raises(RegistryError, match="quickstart/dpo@1 was removed from registry"):
        registry.resolve("quickstart/dpo@1")
    assert make_entry(registry, "quickstart/dpo").ref == "quickstart/dpo@2"  # @1 keeps naming the removed one
    assert registry.dependents(sft) == []  # the removed dpo@1 no longer counts; the new dpo@2 names no parent
    assert registry.remove(sft.ref)[0].ref == sft.ref


def test_remove_with_force_reports_who_named_it(tmp_path):
    registry = Registry(tmp_path / "r")
    _, sft, dpo = _lineage_chain(registry)
    removed, dependents = registry.remove(sft.ref, force=True)
    assert removed.ref == sft.ref and [d.ref for d in dependents] == [dpo.ref]
    assert json.loads((sft.path / "removed.json").read_text())["dependents"] == [dpo.ref]


def test_a_failed_remove_leaves_the_entry_whole(tmp_path, monkeypatch):
    """The entry leaves the registry by one rename: if that fails, every file is still in place."""
    registry = Registry(tmp_path / "r")
    _, _, dpo = _lineage_chain(registry)
    before = sorted(p.relative_to(dpo.path) for p in dpo.path.rglob("*"))

    def failing_rename(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(align.registry.store.os, "rename", failing_rename)
    with pytest.raises(OSError):
        registry.remove(dpo.ref)
    monkeypatch.undo()
    assert sorted(p.relative_to(dpo.path) for p in dpo.path.rglob("*")) == before
    assert registry.resolve(dpo.ref).manifest == dpo.manifest
