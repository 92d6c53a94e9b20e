"""The tracker (`align.stages.tracker`): which trackers a `report` names and which cannot be used, the names the
evaluation's figures are logged under, where TensorBoard writes, a resumed writer hiding the steps the
interrupted attempt logged after its checkpoint, and the config dump that leaves the new keys out while they
are at their defaults (so run folders of earlier versions keep their fingerprint)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from align.config.loading import validate_recipe
from align.config.schema import TrackingSettings
from align.stages.metrics_file import read_metrics
from align.stages.tracker import (
    evaluation_figures,
    open_tracker,
    report_names,
    tensorboard_folder,
    tracker_problem,
)


def _stage_config(**keys):
    raw = {"name": "tiny", "base": "base", "stages": {"sft": {"data": "sft.jsonl", **keys}}}
    return validate_recipe(raw, []).stages["sft"]


def _ctx(tmp_path: Path, **keys):
    return SimpleNamespace(config=_stage_config(**keys), run_dir=tmp_path / "runs" / "tiny" / "sft",
                           recipe=SimpleNamespace(name="tiny"), name="sft")


def test_report_names_lists_the_trackers():
    assert report_names("none") == [] and report_names(None) == []
    assert report_names("tensorboard") == ["tensorboard"]
    assert report_names(["tensorboard", "wandb"]) == ["tensorboard", "wandb"]


@pytest.mark.parametrize("name", ["wandb", "mlflow", "trackio"])
def test_trackers_not_built_yet_say_so(name):
    assert tracker_problem(name).startswith(f"{name} is not supported yet by this version of align")


def test_tensorboard_is_usable_when_installed_and_says_how_to_install_it_otherwise(monkeypatch):
    import importlib.util

    pytest.importorskip("tensorboard")
    assert tracker_problem("tensorboard") is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert tracker_problem("tensorboard") == 'tensorboard is not installed: pip install "align[tensorboard]"'


def test_evaluation_figures_are_named_as_in_the_manifest_under_heldout():
    metrics = {"eval_loss": 1.5, "heldout_reward": 0.4, "heldout_reward_before": 0.1, "train_loss": 2.0,
               "samples": [{"prompt": "p"}], "eval_fingerprint": "abc", "ok": True, "reward/regex": 1}
    assert evaluation_figures(metrics) == {"heldout/eval_loss": 1.5, "heldout/reward": 0.4, "heldout/reward/regex": 1}


def test_tensorboard_writes_into_the_run_folder_unless_tracking_dir_says_otherwise(tmp_path):
    assert tensorboard_folder(_ctx(tmp_path)) == tmp_path / "runs" / "tiny" / "sft" / "tensorboard"
    assert tensorboard_folder(_ctx(tmp_path, tracking={"dir": "tb"})) == Path("tb") / "tiny" / "sft"
    assert tensorboard_folder(_ctx(tmp_path, tracking={"dir": "tb", "run_name": "x"})) == Path("tb") / "x"


def test_without_report_only_metrics_jsonl_is_written(tmp_path):
    ctx = _ctx(tmp_path)
    tracker = open_tracker(ctx, None)
    tracker.log_step(1, {"reward": 0.5})
    tracker.close()
    assert tracker.writer is None and tracker.record() == {"metrics": str((ctx.run_dir / "metrics.jsonl").resolve())}
    assert sorted(p.name for p in ctx.run_dir.iterdir()) == ["metrics.jsonl"]


def test_a_resumed_writer_hides_the_steps_logged_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ctx = _ctx(tmp_path, report="tensorboard")
    first = open_tracker(ctx, None)
    for step in range(1, 6):  # interrupted after step 5; its last checkpoint was at step 2
        first.log_step(step, {"reward": float(step)})
    first.close()
    resumed = open_tracker(ctx, 2)
    for step in (3, 4):
        resumed.log_step(step, {"reward": 10.0 * step})
    resumed.close()

    events = EventAccumulator(str(tensorboard_folder(ctx)))
    events.Reload()
    assert [(p.step, p.value) for p in events.Scalars("reward")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [(r["step"], r["reward"]) for r in read_metrics(ctx.run_dir / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_the_config_dump_leaves_report_and_tracking_out_while_at_their_defaults():
    assert not {"report", "tracking"} & set(_stage_config().model_dump(by_alias=True))
    assert not {"report", "tracking"} & set(_stage_config(report="none", tracking={}).model_dump(by_alias=True))
    dump = _stage_config(report=["tensorboard"], tracking={"project": "p"}).model_dump(by_alias=True)
    assert dump["report"] == ["tensorboard"]
    assert dump["tracking"] == TrackingSettings(project="p").model_dump()


def test_every_kinds_config_dump_leaves_them_out_at_their_defaults():
    """PPO's config has a serializer of its own: the keys stay out of its dump all the same."""
    raw = {"name": "tiny", "base": "base", "stages": {
        "sft": {"data": "a.jsonl"}, "reward": {"data": "p.jsonl"}, "dpo": {"data": "p.jsonl"},
        "ppo": {"prompts": "q.jsonl", "rewards": [{"checker": "regex", "args": {"pattern": "[0-9]"}}]}}}
    for name, cfg in validate_recipe(raw, []).stages.items():
        assert not {"report", "tracking"} & set(cfg.model_dump(by_alias=True)), name
        assert cfg.model_copy(update={"report": "tensorboard"}).model_dump(by_alias=True)["report"] == "tensorboard"


def test_defaults_set_report_and_tracking_for_every_stage_that_does_not():
    raw = {"name": "tiny", "base": "base", "defaults": {"report": "tensorboard", "tracking": {"project": "p"}},
           "stages": {"sft": {"data": "a.jsonl", "tracking": {"tags": ["x"]}},
                      "sft_off": {"kind": "sft", "data": "a.jsonl", "report": "none"}}}
    stages = validate_recipe(raw, []).stages
    assert stages["sft"].report == "tensorboard" and stages["sft_off"].report == "none"
    assert stages["sft"].tracking == TrackingSettings(project="p", tags=["x"])
