"""The `align` command: problems go to stderr as a message with exit status 2, never a traceback."""

from __future__ import annotations

import yaml

from align.cli import main
from align.registry import Registry


def write_recipe(path, raw: dict):
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_plan_of_a_bad_recipe_prints_all_problems_and_returns_2(tiny_raw_recipe, tmp_path, capsys):
    raw = tiny_raw_recipe(tmp_path)
    raw["base"] = "no-such-model"
    raw["stages"]["sft"]["data"] = str(tmp_path / "missing.jsonl")
    raw["stages"]["sft"]["lr"] = "fast"
    raw["eval"]["checkers"] = ["no_such_checker"]
    recipe = write_recipe(tmp_path / "bad.yaml", raw)

    # Schema problems are reported first (the recipe cannot be planned until it validates).
    assert main(["--registry", str(tmp_path / "registry"), "plan", recipe]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "plan OK" not in out
    assert "stages.sft.lr: expected a number, got \"fast\"" in err

    raw["stages"]["sft"]["lr"] = 1e-2
    write_recipe(tmp_path / "bad.yaml", raw)
    assert main(["--registry", str(tmp_path / "registry"), "plan", recipe]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.startswith("error: ")
    assert "3 problems found" in err
    for where in ("base: ", "stages.sft.data: ", "eval.checkers[0]: "):
        assert f"  - {where}" in err, err


def test_plan_of_a_good_recipe_returns_0(tiny_raw_recipe, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "good.yaml", tiny_raw_recipe(tmp_path))
    assert main(["--registry", str(tmp_path / "registry"), "plan", recipe]) == 0
    out, err = capsys.readouterr()
    assert "1. sft [sft]" in out
    assert "plan OK: no weights were loaded" in out


def test_plan_of_a_missing_recipe_file(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    _, err = capsys.readouterr()
    assert "nope.yaml: recipe file not found" in err


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
