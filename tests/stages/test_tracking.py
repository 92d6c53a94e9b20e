"""Tracking end to end on tiny stages: with `report: tensorboard` every stage kind (SFT, reward, DPO, PPO) writes
TensorBoard events whose loss (PPO: reward) at every logged step is the one in `metrics.jsonl` and in the
manifest's history, with the resolved config and the entry's ref in the logged text and the files named in
the manifest; without `report` only `metrics.jsonl` is written; a resumed run logs each step once; a
tracker this version or machine cannot use is refused at plan time, naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.cli.main import main
from align.config.loading import validate_recipe
from align.errors import ConfigError
from align.pipeline.plan import make_plan
from align.pipeline.run import run_recipe
from align.registry.store import Registry
from align.stages.metrics_file import read_metrics
from tests.conftest import EVAL_ROWS, SFT_ROWS, write_jsonl

pytest.importorskip("tensorboard")

PAIRS = [{"prompt": f"Question {i}: can you help?", "chosen": ["Sure, glad to help.", "Of course."][i % 2],
          "rejected": ["No. Go away.", "Leave me alone."][i % 3 % 2]} for i in range(24)]
PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]
COMMON = {"max_steps": 3, "batch_size": 4, "logging_steps": 1, "save_steps": 2, "lr": 5e-3, "scheduler": "constant",
          "eval_split": 0.25, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
PPO = {"rewards": [{"checker": "regex", "args": {"pattern": "[0-9]"}}], "rollout_batch": 8, "minibatch": 8,
       "batch_size": 8, "ppo_epochs": 1, "generation": {"max_new_tokens": 4, "temperature": 1.0},
       "kl": {"coef": 0.01}, "eval_split": 0.1}


def _raw(folder: Path, base, kind: str, stage: dict | None = None) -> dict:
    body = {"sft": {"data": str(write_jsonl(folder / "sft.jsonl", SFT_ROWS))},
            "reward": {"data": str(write_jsonl(folder / "prefs.jsonl", PAIRS)), "gate": {"min_accuracy": 0.0}},
            "dpo": {"data": str(write_jsonl(folder / "prefs.jsonl", PAIRS))},
            "ppo": {"from": "base", "prompts": str(write_jsonl(folder / "prompts.jsonl", PROMPTS)), **PPO}}[kind]
    prompts = write_jsonl(folder / "eval_prompts.jsonl", EVAL_ROWS)
    return {"name": "tiny", "base": str(base), "stages": {kind: {**COMMON, **body, **(stage or {})}},
            "eval": {"metrics": ["loss", "checkers"], "prompts": str(prompts), "checkers": ["math_answer"],
                     "generation": {"max_new_tokens": 4}, "limit": 2}}


def _run(folder: Path, base, kind: str, stage: dict | None = None):
    recipe = validate_recipe(_raw(folder, base, kind, stage), [], source=str(folder / "r.yaml"))
    registry = Registry(folder / "registry")
    return run_recipe(recipe, registry, runs_root=folder / "runs")[kind]


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _scalars(events, tag: str) -> dict[int, float]:
    points = events.Scalars(tag)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
    return {p.step: p.value for p in points}


def _text(events, tag: str) -> str:
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def _hparams(folder: Path) -> dict:
    """The hyperparameters TensorBoard's hparams plugin shows for the run in `folder`."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(folder))
    events.Reload()
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {key: value.string_value or value.number_value for key, value in values.items()}


def _by_step(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if r.get(key) is not None}


# The TensorBoard tag of each kind's headline figure (transformers' callback names the Trainer's `loss`
# `train/loss`; PPO's figures keep their own names) and its name in metrics.jsonl and the history.
HEADLINE = {"sft": ("train/loss", "loss"), "reward": ("train/loss", "loss"), "dpo": ("train/loss", "loss"),
            "ppo": ("reward", "reward")}


@pytest.mark.parametrize("kind", ["sft", "reward", "dpo", "ppo"])
def test_every_stage_logs_the_same_figures_to_tensorboard_metrics_jsonl_and_its_history(kind, tmp_path, tiny_base):
    entry = _run(tmp_path, tiny_base, kind, {"report": "tensorboard"})
    run_dir = tmp_path / "runs" / "tiny" / kind
    assert entry.manifest["tracking"] == {"metrics": str((run_dir / "metrics.jsonl").resolve()),
                                          "tensorboard": str((run_dir / "tensorboard").resolve())}
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps))  # one line per step, in order

    tag, name = HEADLINE[kind]
    history = _by_step(entry.manifest["history"], name)
    assert sorted(history) == [1, 2, 3]
    assert _by_step(records, name) == history
    assert _scalars(_events(run_dir / "tensorboard"), tag) == pytest.approx(history, rel=1e-6)

    events = _events(run_dir / "tensorboard")
    assert entry.ref == "tiny/" + kind + "@1" and entry.ref in _text(events, "entry")
    stage = _text(events, "stage")
    assert entry.manifest["config_hash"] in stage and str(tiny_base) in stage
    assert json.loads(_text(events, "config").strip("`\n")) == entry.manifest["config"]
    assert entry.manifest["config"]["report"] == "tensorboard"
    hparams = _hparams(run_dir / "tensorboard")
    assert hparams["lr"] == pytest.approx(COMMON["lr"]) and hparams["report"] == "tensorboard"
    assert hparams["lineage.config_hash"] == entry.manifest["config_hash"]
    assert hparams["lineage.data_hash"] == entry.manifest["data"]["train"]["fingerprint"]


def test_the_evaluation_before_and_after_training_starts_and_ends_the_curves(tmp_path, tiny_base):
    entry = _run(tmp_path, tiny_base, "sft", {"report": "tensorboard"})
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    records = read_metrics(run_dir / "metrics.jsonl")
    before, after = entry.manifest["baseline"]["metrics"], entry.manifest["metrics"]
    expected = {0: before["eval_loss"], 3: after["eval_loss"]}
    assert _by_step(records, "heldout/eval_loss") == pytest.approx(expected)
    assert _scalars(_events(run_dir / "tensorboard"), "heldout/eval_loss") == pytest.approx(expected, rel=1e-6)
    last = records[-1]  # the evaluation after training is merged into the last step's line
    assert last["step"] == 3 and "loss" in last and "heldout/eval_loss" in last


def test_a_run_without_report_writes_metrics_jsonl_and_no_tensorboard_folder(tmp_path, tiny_base):
    entry = _run(tmp_path, tiny_base, "sft")
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    assert entry.manifest["tracking"] == {"metrics": str((run_dir / "metrics.jsonl").resolve())}
    assert _by_step(read_metrics(run_dir / "metrics.jsonl"), "loss") == _by_step(entry.manifest["history"], "loss")
    assert not (run_dir / "tensorboard").exists() and not list(run_dir.rglob("events.out.tfevents.*"))
    assert "report" not in entry.manifest["config"] and "tracking" not in entry.manifest["config"]


def _run_killed_at_step_4(folder: Path, base, stage: dict, monkeypatch) -> None:
    """Run an SFT stage that dies at the first micro-batch of step 4 (after checkpoint-2 was written)."""
    import align.stages.callbacks as callbacks

    real = callbacks.check_finite

    class Crash(Exception):
        pass

    def crash_at_step_4(value: float, step: int) -> None:
        if step == 4:
            raise Crash("killed at step 4")
        real(value, step)

    monkeypatch.setattr(callbacks, "check_finite", crash_at_step_4)
    with pytest.raises(Crash):
        _run(folder, base, "sft", stage)


def test_a_resumed_run_logs_each_step_once(tmp_path, tiny_base, monkeypatch):
    stage = {"report": "tensorboard", "max_steps": 5}
    _run_killed_at_step_4(tmp_path, tiny_base, stage, monkeypatch)
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]  # checkpoint-2 saved
    monkeypatch.undo()

    entry = _run(tmp_path, tiny_base, "sft", stage)
    assert entry.manifest["timings"]["resumed_from"].endswith("checkpoint-2")
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    history = _by_step(entry.manifest["history"], "loss")
    assert _by_step(records, "loss") == history and sorted(history) == [1, 2, 3, 4, 5]
    assert _scalars(_events(run_dir / "tensorboard"), "train/loss") == pytest.approx(history, rel=1e-6)


def test_a_run_interrupted_without_a_tracker_resumes_with_one(tmp_path, tiny_base, monkeypatch):
    """`report` says how a run is watched, not what it trains: adding it to an interrupted run resumes the
    run (its fingerprint leaves the key out) instead of refusing it as another config."""
    _run_killed_at_step_4(tmp_path, tiny_base, {"max_steps": 5}, monkeypatch)
    monkeypatch.undo()
    entry = _run(tmp_path, tiny_base, "sft", {"max_steps": 5, "report": "tensorboard"})
    assert entry.manifest["timings"]["resumed_from"].endswith("checkpoint-2")
    assert entry.manifest["config"]["report"] == "tensorboard"
    assert (tmp_path / "runs" / "tiny" / "sft" / "tensorboard").is_dir()


def test_tracking_dir_and_run_name_place_the_events(tmp_path, tiny_base):
    stage = {"report": ["tensorboard"], "max_steps": 1, "tracking": {"dir": str(tmp_path / "tb"), "run_name": "first",
                                                                    "project": "demo", "tags": ["a"]}}
    entry = _run(tmp_path, tiny_base, "sft", stage)
    assert entry.manifest["tracking"]["tensorboard"] == str((tmp_path / "tb" / "first").resolve())
    events = _events(tmp_path / "tb" / "first")
    assert "demo" in _text(events, "tracking") and sorted(_scalars(events, "train/loss")) == [1]
    assert not (tmp_path / "runs" / "tiny" / "sft" / "tensorboard").exists()


def test_models_show_says_where_the_curves_are(tmp_path, tiny_base, capsys):
    entry = _run(tmp_path, tiny_base, "sft", {"report": "tensorboard", "max_steps": 1})
    capsys.readouterr()
    assert main(["--registry", str(tmp_path / "registry"), "models", "show", entry.ref]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["tracking"] == entry.manifest["tracking"]  # stdout stays the manifest's JSON
    assert f"tensorboard: {entry.manifest['tracking']['tensorboard']}" in err
    assert f"metrics: {entry.manifest['tracking']['metrics']}" in err


# ------------------------------------------------------------------------------------------ plan time


@pytest.mark.parametrize("report, named", [(["wandb"], "wandb is not supported yet"),
                                           ("mlflow", "mlflow is not supported yet"),
                                           (["tensorboard", "trackio"], "trackio is not supported yet")])
def test_a_tracker_not_built_yet_is_a_plan_problem_naming_the_key(report, named, tmp_path, tiny_base):
    recipe = validate_recipe(_raw(tmp_path, tiny_base, "sft", {"report": report}), [])
    with pytest.raises(ConfigError) as err:
        make_plan(recipe, Registry(tmp_path / "registry"))
    assert [str(p) for p in err.value.problems if named in str(p)] == [f"stages.sft.report: {named} by this version "
                                                                      "of align (supported: tensorboard); every run "
                                                                      "writes metrics.jsonl in its run folder meanwhile"]


def test_tensorboard_not_installed_is_a_plan_problem_saying_what_to_install(tmp_path, tiny_base, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    raw = _raw(tmp_path, tiny_base, "sft")
    raw["defaults"] = {"report": "tensorboard"}
    with pytest.raises(ConfigError) as err:
        make_plan(validate_recipe(raw, []), Registry(tmp_path / "registry"))
    assert 'stages.sft.report: tensorboard is not installed: pip install "align[tensorboard]"' in str(err.value)


def test_an_unknown_tracker_is_a_schema_error_naming_the_key(tmp_path, tiny_base):
    with pytest.raises(ConfigError) as err:
        validate_recipe(_raw(tmp_path, tiny_base, "sft", {"report": "tensorbord"}), [])
    assert [str(p) for p in err.value.problems] == [
        "stages.sft.report: expected none, a tracker or a list of trackers (tensorboard, wandb, mlflow, trackio), "
        "got 'tensorbord'"]


def test_the_report_flag_overrides_every_stage_and_is_planned(tmp_path, tiny_base, capsys, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)  # `align run` trains into ./runs

    raw = _raw(tmp_path, tiny_base, "sft", {"report": "tensorboard"})
    raw["stages"]["sft_again"] = {**raw["stages"]["sft"], "kind": "sft", "from": "sft"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["--registry", str(tmp_path / "registry"), "run", str(path), "--report", "wandb"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "stages.sft.report: wandb is not supported yet" in err
    assert "stages.sft_again.report: wandb is not supported yet" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "registry" / "tiny").exists()
