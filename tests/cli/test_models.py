"""`align models`: listing with filters, showing, removing; a bad ref is one clear error (status 2)."""

from __future__ import annotations

import pytest

from align.cli.main import main
from align.registry.store import Registry


def test_models_list_on_an_empty_registry(tmp_path, capsys):
    root = tmp_path / "registry"
    assert main(["--registry", str(root), "models", "list"]) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == f"registry {root} is empty"


def test_models_list_and_show_an_entry(tmp_path, capsys):
    registry = Registry(tmp_path / "registry")
    with registry.create("quickstart/sft", "policy") as draft:
        draft.manifest.update({"artifact": {"type": "adapter", "path": "adapter"},
                               "parent": {"source": "registry", "ref": "smollm2-135m-instruct@1"},
                               "history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]})
    assert main(["--registry", str(registry.root), "models", "list"]) == 0
    out, _ = capsys.readouterr()
    assert "quickstart/sft@1" in out and "smollm2-135m-instruct@1" in out and "adapter" in out

    assert main(["--registry", str(registry.root), "models", "show", "quickstart/sft"]) == 0
    out, _ = capsys.readouterr()
    assert '"ref": "quickstart/sft@1"' in out
    assert "2 records (--full shows them)" in out


def test_models_show_of_an_unknown_ref_returns_2(tmp_path, capsys):
    registry = Registry(tmp_path / "registry")
    with registry.create("quickstart/sft", "policy") as draft:
        draft.manifest.update({"artifact": {"type": "adapter", "path": "adapter"}})
    assert main(["--registry", str(registry.root), "models", "show", "quickstart/sftt"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "quickstart/sftt: no such entry" in err
    assert "did you mean quickstart/sft" in err


def _entries(registry: Registry):
    """A base, quickstart's sft on it, a reward entry of another recipe: three names, two recipes, three kinds."""
    refs = []
    for name, kind, recipe, parent in [("base-model", "base", None, None), ("quickstart/sft", "policy", "quickstart",
                                        "base-model@1"), ("hh/reward", "reward", "hh", None)]:
        with registry.create(name, kind) as draft:
            draft.manifest.update({"artifact": {"type": "full", "path": "model"},
                                   **({"recipe": {"name": recipe}} if recipe else {}),
                                   **({"parent": {"source": "registry", "ref": parent}} if parent else {})})
        refs.append(draft.entry.ref)
    return refs


def _listed(capsys) -> list[str]:
    out, _ = capsys.readouterr()
    return [line.split()[0] for line in out.splitlines()[1:] if not line.startswith(" ")]  # not "damaged:" notes


@pytest.mark.parametrize("flags, expected", [
    ([], ["base-model@1", "hh/reward@1", "quickstart/sft@1"]),
    (["--recipe", "quickstart"], ["quickstart/sft@1"]),
    (["--kind", "reward"], ["hh/reward@1"]),
    (["--name", "sft"], ["quickstart/sft@1"]),
    (["--name", "*e*"], ["base-model@1", "hh/reward@1"]),
    (["--recipe", "hh", "--kind", "policy"], []),
])
def test_models_list_filters(flags, expected, tmp_path, capsys):
    registry = Registry(tmp_path / "registry")
    _entries(registry)
    assert main(["--registry", str(registry.root), "models", "list", *flags]) == 0
    if expected:
        assert _listed(capsys) == expected
    else:
        assert "no entry of registry" in capsys.readouterr()[0]


def test_models_rm_refuses_a_parent_then_removes_with_force(tmp_path, capsys):
    registry = Registry(tmp_path / "registry")
    _entries(registry)
    assert main(["--registry", str(registry.root), "models", "rm", "base-model@1"]) == 2
    _, err = capsys.readouterr()
    assert "base-model@1: 1 other entry names it (quickstart/sft@1)" in err and "--force" in err
    assert registry.find("base-model@1") is not None

    assert main(["--registry", str(registry.root), "models", "rm", "hh/reward@1"]) == 0
    assert capsys.readouterr()[0].startswith("removed hh/reward@1 (reward")
    assert main(["--registry", str(registry.root), "models", "rm", "base-model@1", "--force"]) == 0
    out, _ = capsys.readouterr()
    assert "removed base-model@1" in out and "still naming it (--force): quickstart/sft@1" in out
    assert main(["--registry", str(registry.root), "models", "list"]) == 0
    assert _listed(capsys) == ["quickstart/sft@1"]
    assert main(["--registry", str(registry.root), "models", "show", "base-model@1"]) == 2
    assert "base-model@1 was removed from registry" in capsys.readouterr()[1]
