"""The `align` command: problems go to stderr as a message with exit status 2, never a traceback."""

from __future__ import annotations

import pytest
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


def _bad_data_file(tmp_path, raw):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "What is 1 + 1?", "completion": "2"}\n{"prompt": "What is 2 + 2?", "compl')
    raw["stages"]["sft"]["data"] = str(path)
    return "sft.jsonl: line 2"


def _binary_data_file(tmp_path, raw):
    path = tmp_path / "sft.parquet"
    path.write_bytes(b"\x00\xff" * 64)
    raw["stages"]["sft"]["data"] = str(path)
    return "sft.parquet"


def _model_folder_without_config(tmp_path, raw):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    raw["base"] = str(folder)
    return "config.json"


def _recipe_that_is_a_list(tmp_path, raw):
    raw.clear()
    raw["__list__"] = True
    return "a recipe must be a YAML mapping, got a list"


@pytest.mark.parametrize("spoil", [_bad_data_file, _binary_data_file, _model_folder_without_config,
                                   _recipe_that_is_a_list])
@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_corrupt_file_is_one_clear_error_with_status_2(spoil, command, tiny_raw_recipe, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)  # `run` would make runs/ here
    raw = tiny_raw_recipe(tmp_path)
    named = spoil(tmp_path, raw)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(["name", "stages"]) if raw.get("__list__") else yaml.safe_dump(raw))
    code = main(["--registry", str(tmp_path / "registry"), command, str(path)])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and named in problems[0], err
    assert not (tmp_path / "registry").exists() and not (tmp_path / "runs").exists()


def test_models_show_into_a_pipe_closed_early_ends_quietly(tmp_path):
    """`align models show REF --full | head -1`: the reader leaves after one line; no BrokenPipeError."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    registry = Registry(tmp_path / "registry")
    with registry.create("quickstart/sft", "policy") as draft:
        draft.manifest.update({"history": [{"step": i, "loss": 1.0} for i in range(20000)]})  # >> a pipe's buffer
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "--registry", str(registry.root), "models", "show",
                             "quickstart/sft", "--full"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"{"
    proc.stdout.close()  # what `head -1` does
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()[-2000:]
    assert proc.returncode == 141


def test_a_full_disk_no_narrower_handler_named_is_one_clear_error(tmp_path, capsys, monkeypatch):
    import align.cli

    def full(args):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                           "left on device\" })")

    monkeypatch.setattr(align.cli, "cmd_models", full)
    assert main(["--registry", str(tmp_path / "registry"), "models", "list"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err.startswith("error: no space left on device writing "), err
