"""Tracking end to end on tiny stages: the evaluation before and after training starts and ends the curves;
without `report` only `metrics.jsonl` is written; a run interrupted without a tracker resumes with one;
`tracking.dir` and `run_name` place the events; `models show` says where the curves are; a tracker this
version or machine cannot use is refused at plan time, naming the key. (Each tracker's read-back of every
stage kind and of a resumed run: `test_tracking_backends.py`.)"""

from __future__ import annotations

import json

import pytest

from align.cli.main import main
from align.config.loading import validate_recipe
from align.errors import ConfigError
from align.pipeline.plan import make_plan
from align.registry.store import Registry
from align.stages.metrics_file import read_metrics
from tests.stages.tracking_helpers import (
    by_step,
    raw_recipe,
    run_killed_at_step_4,
    run_stage,
    tb_events,
    tb_scalars,
    tb_text,
)

pytest.importorskip("tensorboard")


def test_the_evaluation_before_and_after_training_starts_and_ends_the_curves(tmp_path, tiny_base):
    entry = run_stage(tmp_path, tiny_base, "sft", {"report": "tensorboard"})
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    records = read_metrics(run_dir / "metrics.jsonl")
    before, after = entry.manifest["baseline"]["metrics"], entry.manifest["metrics"]
    expected = {0: before["eval_loss"], 3: after["eval_loss"]}
    assert by_step(records, "heldout/eval_loss") == pytest.approx(expected)
    assert tb_scalars(tb_events(run_dir / "tensorboard"), "heldout/eval_loss") == pytest.approx(expected, rel=1e-6)
    last = records[-1]  # the evaluation after training is merged into the last step's line
    assert last["step"] == 3 and "loss" in last and "heldout/eval_loss" in last


def test_a_run_without_report_writes_metrics_jsonl_and_no_tensorboard_folder(tmp_path, tiny_base):
    entry = run_stage(tmp_path, tiny_base, "sft")
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    assert entry.manifest["tracking"] == {"metrics": str((run_dir / "metrics.jsonl").resolve())}
    assert by_step(read_metrics(run_dir / "metrics.jsonl"), "loss") == by_step(entry.manifest["history"], "loss")
    assert not (run_dir / "tensorboard").exists() and not list(run_dir.rglob("events.out.tfevents.*"))
    assert "report" not in entry.manifest["config"] and "tracking" not in entry.manifest["config"]


def test_a_run_interrupted_without_a_tracker_resumes_with_one(tmp_path, tiny_base, monkeypatch):
    """`report` says how a run is watched, not what it trains: adding it to an interrupted run resumes the
    run (its fingerprint leaves the key out) instead of refusing it as another config."""
    run_killed_at_step_4(tmp_path, tiny_base, {"max_steps": 5}, monkeypatch)
    monkeypatch.undo()
    entry = run_stage(tmp_path, tiny_base, "sft", {"max_steps": 5, "report": "tensorboard"})
    assert entry.manifest["timings"]["resumed_from"].endswith("checkpoint-2")
    assert entry.manifest["config"]["report"] == "tensorboard"
    assert (tmp_path / "runs" / "tiny" / "sft" / "tensorboard").is_dir()


def test_tracking_dir_and_run_name_place_the_events(tmp_path, tiny_base):
    stage = {"report": ["tensorboard"], "max_steps": 1, "tracking": {"dir": str(tmp_path / "tb"), "run_name": "first",
                                                                    "project": "demo", "tags": ["a"]}}
    entry = run_stage(tmp_path, tiny_base, "sft", stage)
    assert entry.manifest["tracking"]["tensorboard"] == str((tmp_path / "tb" / "first").resolve())
    events = tb_events(tmp_path / "tb" / "first")
    assert "demo" in tb_text(events, "tracking") and sorted(tb_scalars(events, "train/loss")) == [1]
    assert not (tmp_path / "runs" / "tiny" / "sft" / "tensorboard").exists()


def test_models_show_says_where_the_curves_are(tmp_path, tiny_base, capsys):
    entry = run_stage(tmp_path, tiny_base, "sft", {"report": "tensorboard", "max_steps": 1})
    capsys.readouterr()
    assert main(["--registry", str(tmp_path / "registry"), "models", "show", entry.ref]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["tracking"] == entry.manifest["tracking"]  # stdout stays the manifest's JSON
    assert f"tensorboard: {entry.manifest['tracking']['tensorboard']}" in err
    assert f"metrics: {entry.manifest['tracking']['metrics']}" in err


# ------------------------------------------------------------------------------------------ plan time


def test_a_tracker_not_built_yet_is_a_plan_problem_naming_the_key(tmp_path, tiny_base):
    recipe = validate_recipe(raw_recipe(tmp_path, tiny_base, "sft", {"report": ["tensorboard", "trackio"]}), [])
    with pytest.raises(ConfigError) as err:
        make_plan(recipe, Registry(tmp_path / "registry"))
    assert [str(p) for p in err.value.problems if "trackio" in str(p)] == [
        ("stages.sft.report: trackio is not supported yet by this version of align (supported: tensorboard, wandb, "
         "mlflow); every run writes metrics.jsonl in its run folder meanwhile")]


def test_tensorboard_not_installed_is_a_plan_problem_saying_what_to_install(tmp_path, tiny_base, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    raw = raw_recipe(tmp_path, tiny_base, "sft")
    raw["defaults"] = {"report": "tensorboard"}
    with pytest.raises(ConfigError) as err:
        make_plan(validate_recipe(raw, []), Registry(tmp_path / "registry"))
    assert 'stages.sft.report: tensorboard is not installed: pip install "align[tensorboard]"' in str(err.value)


def test_an_unknown_tracker_is_a_schema_error_naming_the_key(tmp_path, tiny_base):
    with pytest.raises(ConfigError) as err:
        validate_recipe(raw_recipe(tmp_path, tiny_base, "sft", {"report": "tensorbord"}), [])
    assert [str(p) for p in err.value.problems] == [
        ("stages.sft.report: expected none, a tracker or a list of trackers (tensorboard, wandb, mlflow, trackio), "
         "got 'tensorbord'")]


def test_the_report_flag_overrides_every_stage_and_is_planned(tmp_path, tiny_base, capsys, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)  # `align run` trains into ./runs

    raw = raw_recipe(tmp_path, tiny_base, "sft", {"report": "tensorboard"})
    raw["stages"]["sft_again"] = {**raw["stages"]["sft"], "kind": "sft", "from": "sft"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["--registry", str(tmp_path / "registry"), "run", str(path), "--report", "mlflow,trackio"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "stages.sft.report: trackio is not supported yet" in err
    assert "stages.sft_again.report: trackio is not supported yet" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "registry" / "tiny").exists()
