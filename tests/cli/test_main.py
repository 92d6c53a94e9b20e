"""The `align` command: problems go to stderr as a message with exit status 2, never a traceback."""

from __future__ import annotations

import pytest
import yaml

from align.cli.main import main
from align.registry.store import Registry


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

    # Schema problems and the plan's problems (refs, files, checkers) come in one report.
    assert main(["--registry", str(tmp_path / "registry"), "plan", recipe]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "plan OK" not in out
    assert "stages.sft.lr: expected a number, got \"fast\"" in err
    assert "4 problems found" in err
    for where in ("base: ", "stages.sft.data: ", "eval.checkers[0]: "):
        assert f"  - {where}" in err, err

    raw["stages"]["sft"]["lr"] = 1e-2
    write_recipe(tmp_path / "bad.yaml", raw)
    assert main(["--registry", str(tmp_path / "registry"), "plan", recipe]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.startswith("error: ")
    assert "3 problems found" in err
    for where in ("base: ", "stages.sft.data: ", "eval.checkers[0]: "):
        assert f"  - {where}" in err, err


def test_run_reports_the_readmes_three_errors_at_once(tiny_raw_recipe, tmp_path, capsys):
    """The README's example: a wrong type, an unknown key and a missing data file, in one report from `align
    run` (before, the missing file came only in a second round), and nothing is trained."""
    raw = tiny_raw_recipe(tmp_path)
    raw["stages"]["sft"].update({"lr": "fast", "epoch": 1, "data": "data/missing.jsonl"})
    recipe = write_recipe(tmp_path / "x.yaml", raw)
    assert main(["--registry", str(tmp_path / "registry"), "run", recipe]) == 2
    _, err = capsys.readouterr()
    assert err.splitlines()[1:] == ['  - stages.sft.lr: expected a number, got "fast"',
                                    '  - stages.sft.epoch: unknown key (did you mean "epochs"?)',
                                    "  - stages.sft.data: data/missing.jsonl: file not found"], err
    assert not (tmp_path / "registry").exists() or not any((tmp_path / "registry").iterdir())


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

    from tests.conftest import REPO_ROOT

    registry = Registry(tmp_path / "registry")
    with registry.create("quickstart/sft", "policy") as draft:
        draft.manifest.update({"history": [{"step": i, "loss": 1.0} for i in range(20000)]})  # >> a pipe's buffer
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "align.cli.main", "--registry", str(registry.root), "models", "show",
                             "quickstart/sft", "--full"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"{"
    proc.stdout.close()  # what `head -1` does
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()[-2000:]
    assert proc.returncode == 141


def test_a_full_disk_no_narrower_handler_named_is_one_clear_error(tmp_path, capsys, monkeypatch):
    import align.cli.models

    def full(args):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                           "left on device\" })")

    monkeypatch.setattr(align.cli.models, "cmd_models", full)
    assert main(["--registry", str(tmp_path / "registry"), "models", "list"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err.startswith("error: no space left on device writing "), err


# ------------------------------------------------------------------------------------------ --version, recipes


def test_version_prints_align_and_its_libraries(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr()[0]
    assert out.startswith(f"align {metadata.version('align')} (python ") and "transformers" in out
    assert len(out.splitlines()) == 1


def test_recipes_lists_every_shipped_recipe_with_its_description(capsys):
    from tests.conftest import REPO_ROOT

    shipped = sorted(p for p in (REPO_ROOT / "recipes").glob("**/*.yaml") if "accelerate" not in p.parts)
    assert main(["recipes"]) == 0
    lines = capsys.readouterr()[0].splitlines()
    assert len(lines) == len(shipped) >= 5
    for path, line in zip(shipped, lines):
        raw = yaml.safe_load(path.read_text())
        assert line.split()[0].endswith(str(path.relative_to(REPO_ROOT)))
        assert raw["description"] and line.endswith(raw["description"])
    assert any("quickstart.yaml" in line and "sft, reward, ppo, dpo" in line for line in lines)


def test_recipes_in_a_folder_fall_back_to_the_first_comment_sentence(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("# Teaches the answer format. More words here.\nname: a\nbase: x\n"
                                     "stages: {sft: {data: d.jsonl}}\n")
    (tmp_path / "not_a_recipe.yaml").write_text("compute_environment: LOCAL_MACHINE\n")
    assert main(["recipes", str(tmp_path)]) == 0
    lines = capsys.readouterr()[0].splitlines()
    assert len(lines) == 1 and lines[0].endswith("sft  Teaches the answer format.")


def test_run_continue_reaches_the_stages_and_excludes_force(tiny_raw_recipe, tmp_path, capsys, monkeypatch):
    import align.pipeline.run

    seen = {}
    monkeypatch.setattr(align.pipeline.run, "run_recipe", lambda *args, **kwargs: seen.update(kwargs) or {})
    recipe = write_recipe(tmp_path / "r.yaml", tiny_raw_recipe(tmp_path))
    assert main(["--registry", str(tmp_path / "registry"), "run", recipe, "--continue",
                 "--set", "stages.sft.max_steps=20"]) == 0
    assert seen == {"force": False, "continue_run": True}
    with pytest.raises(SystemExit) as info:
        main(["run", recipe, "--continue", "--force"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr()[1]


def test_help_lists_every_command_group_in_one_order(capsys):
    """The subcommands live in one module per group; `align --help` still lists them as before."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr()[0]
    assert "{recipes,plan,run,score,merge,export,check-export,eval,report,chat,playground,models}" in out
