from __future__ import annotations

import json
import multiprocessing
import time

import pytest

import align.registry
from align.errors import RegistryError
from align.registry import MANIFEST, Registry, parse_ref


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

    monkeypatch.setattr(align.registry.os, "rename", crash)
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

    monkeypatch.setattr(align.registry.os, "replace", crash)
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
