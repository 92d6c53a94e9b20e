"""The tracker (`align.stages.tracker`): which trackers a `report` names and which cannot be used, the names the
Trainer's and the evaluation's figures are logged under, where TensorBoard writes and MLflow stores, when W&B
is offline, a resumed writer hiding the steps the interrupted attempt logged after its checkpoint, a resumed
run sending W&B and MLflow only the steps they lack, a failing tracker left out, and the config dump that
leaves the new keys out while they are at their defaults (so run folders of earlier versions keep their
fingerprint)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from align.config.loading import validate_recipe
from align.config.schema import TrackingSettings
from align.stages.metrics_file import MetricsFile, read_metrics
from align.stages.tracker import (
    Tracker,
    evaluation_figures,
    open_tracker,
    report_names,
    tensorboard_folder,
    tracker_problem,
    trainer_figures,
)
from align.stages.trackers.state import TrackingState


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


def test_trackio_is_not_built_yet_and_says_so():
    assert tracker_problem("trackio").startswith("trackio is not supported yet by this version of align "
                                                 "(supported: tensorboard, wandb, mlflow)")


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_a_tracker_is_usable_when_installed_and_says_how_to_install_it_otherwise(name, monkeypatch):
    import importlib.util

    pytest.importorskip(name)
    assert tracker_problem(name) is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == name else real(module, *a))
    assert tracker_problem(name) == f'{name} is not installed: pip install "align[{name}]"'


def test_trainer_logs_are_named_as_transformers_trackers_name_them():
    logs = {"loss": 1.5, "eval_loss": 1.2, "test_accuracy": 0.5, "learning_rate": 1e-3, "epoch": 0.5,
            "note": "text", "step": 3}
    assert trainer_figures(logs) == {"train/loss": 1.5, "eval/loss": 1.2, "test/accuracy": 0.5,
                                     "train/learning_rate": 1e-3, "train/epoch": 0.5}


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


def test_a_resumed_run_sends_an_append_only_tracker_only_what_earlier_attempts_did_not(tmp_path):
    path = tmp_path / "tracking.json"
    first = TrackingState(path, fresh=True)
    first.opened("wandb", {"run_id": "a"})
    for step in (1, 2, 3):  # interrupted after step 3, its checkpoint at step 2
        first.sent("wandb", step, ["train/loss"])
    first.sent("wandb", 3, ["train/grad_norm"])
    assert json.loads(path.read_text()) == {"wandb": {"run_id": "a", "last_step": 3,
                                                      "keys_at_last_step": ["train/grad_norm", "train/loss"]}}

    resumed = TrackingState(path, fresh=False)
    assert resumed.earlier("wandb") == {"run_id": "a", "last_step": 3,
                                        "keys_at_last_step": ["train/grad_norm", "train/loss"]}
    resumed.opened("wandb", {"run_id": "a"})
    assert resumed.unsent("wandb", 2, {"train/loss": 1.0}) == {}
    assert resumed.unsent("wandb", 3, {"train/loss": 1.0, "heldout/eval_loss": 2.0}) == {"heldout/eval_loss": 2.0}
    assert resumed.unsent("wandb", 4, {"train/loss": 1.0}) == {"train/loss": 1.0}

    another_run = TrackingState(path, fresh=False)
    another_run.opened("wandb", {"run_id": "b"})  # e.g. the project changed: a new run, nothing to skip
    assert another_run.unsent("wandb", 2, {"train/loss": 1.0}) == {"train/loss": 1.0}
    assert TrackingState(path, fresh=True).earlier("wandb") is None  # a fresh start opens new runs


class _Broken:
    name, appends_only = "broken", False

    def log_scalars(self, step, figures):
        raise ConnectionError("server gone")

    def record(self):
        return {"run_id": "r1"}

    def close(self, failed):
        raise AssertionError("a tracker that failed is not closed again")


def test_a_tracker_that_fails_is_reported_and_left_out_and_training_goes_on(tmp_path, caplog):
    tracker = Tracker(MetricsFile(tmp_path / "metrics.jsonl", None), [_Broken()])
    tracker.log_step(1, {"reward": 0.5})
    tracker.log_step(2, {"reward": 0.7})
    tracker.close()
    assert [r["reward"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.5, 0.7]
    assert [r.getMessage() for r in caplog.records if "broken" in r.getMessage()] == [
        "broken failed (log: server gone): not logging to it for the rest of this run"]
    assert tracker.record()["broken"] == {"run_id": "r1"}


def test_mlflow_store_and_names(tmp_path, monkeypatch):
    from align.stages.trackers.mlflow_run import mlflow_name, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ctx = _ctx(tmp_path)
    assert tracking_uri(ctx) == (ctx.run_dir / "mlruns").resolve().as_uri()
    assert tracking_uri(_ctx(tmp_path, tracking={"dir": str(tmp_path / "t")})) == (tmp_path / "t" / "mlruns").as_uri()
    assert tracking_uri(_ctx(tmp_path, tracking={"tracking_uri": str(tmp_path / "s")})) == (tmp_path / "s").as_uri()
    assert tracking_uri(_ctx(tmp_path, tracking={"tracking_uri": "http://host:5000"})) == "http://host:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert tracking_uri(ctx) == "sqlite:///x.db"
    assert mlflow_name("reward/regex") == "reward/regex" and mlflow_name("reward/regex", file_store=True) == "reward.regex"
    assert mlflow_name("heldout/win rate (%)") == "heldout/win rate ___"


def test_wandb_is_offline_without_credentials_unless_told(tmp_path, monkeypatch):
    from align.stages.trackers.wandb_run import wandb_mode

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert [wandb_mode(offline) for offline in (None, True, False)] == ["offline", "offline", "offline"]
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert [wandb_mode(offline) for offline in (None, True, False)] == ["online", "offline", "online"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(None) == "offline" and wandb_mode(False) == "online"


def test_no_tracker_package_is_imported_until_a_stage_reports_to_it():
    import subprocess
    import sys

    modules = ["align.stages.tracker", "align.stages.trackers.wandb_run", "align.stages.trackers.mlflow_run",
               "align.stages.trackers.tensorboard_events"]
    code = (f"import sys; import {', '.join(modules)}; "
            "print(sorted(m for m in ('wandb', 'mlflow', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
