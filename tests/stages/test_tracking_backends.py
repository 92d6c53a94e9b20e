"""Every tracker end to end: one tiny run of each stage kind (SFT, reward, DPO, PPO) reports to TensorBoard,
W&B (offline) and MLflow (a file store) at once, and each tracker's own files are read back: the loss (PPO:
reward) of every logged step equals `metrics.jsonl`'s and the manifest history's, under the same names in
every tracker, with the resolved config, the lineage, the entry's ref and its pictures, and the manifest
says where each run is. A run killed after step 3 resumes into the same tracker runs, each step logged once.
A tracker whose package is missing, or a setting no reported tracker reads, is refused at plan time."""

from __future__ import annotations

import importlib.util
import json

import pytest

from align.config.loading import validate_recipe
from align.errors import ConfigError
from align.pipeline.plan import make_plan
from align.registry.store import Registry
from align.stages.metrics_file import read_metrics
from align.stages.trackers.mlflow_run import mlflow_name
from tests.stages.tracking_helpers import (
    COMMON,
    HEADLINE,
    by_step,
    mlflow_points,
    raw_recipe,
    run_killed_at_step_4,
    run_stage,
    tb_events,
    tb_hparams,
    tb_scalars,
    tb_text,
    wandb_points,
    wandb_run,
)

pytest.importorskip("tensorboard")
TRACKERS = ["tensorboard"] + [name for name in ("wandb", "mlflow") if importlib.util.find_spec(name)]
TRACKING = {"offline": True, "tags": ["tiny-test"]} if "wandb" in TRACKERS else {"tags": ["tiny-test"]}
KINDS = ["sft", "reward", "dpo", "ppo"]


@pytest.fixture(scope="module", autouse=True)
def _no_tracker_settings_from_outside(tmp_path_factory):
    """No server, key or store of the machine's: W&B's own folders in a temporary one, MLflow's default store."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as env:
        for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "MLFLOW_TRACKING_URI"):
            env.delenv(name, raising=False)
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(home / name.lower()))
        yield


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_base):
    """kind -> (entry, run folder) of its one run reporting to every installed tracker (made when first asked)."""
    runs = {}

    def run(kind: str):
        if kind not in runs:
            folder = tmp_path_factory.mktemp(f"tracked-{kind}")
            entry = run_stage(folder, tiny_base, kind, {"report": TRACKERS, "tracking": TRACKING})
            runs[kind] = entry, folder / "runs" / "tiny" / kind
        return runs[kind]

    return run


def _needs(name: str):
    if name not in TRACKERS:
        pytest.skip(f"{name} is not installed")


def _loss_history(entry, kind: str) -> dict[int, float]:
    history = by_step(entry.manifest["history"], HEADLINE[kind][1])
    assert sorted(history) == [1, 2, 3]
    return history


def _pictures(entry) -> list[str]:
    names = sorted(path.name for path in entry.path.glob("*.png"))
    assert names  # training_curve.png, and each kind's own (PPO: rl_curves.png, reward_histogram.png)
    return names


@pytest.mark.parametrize("kind", KINDS)
def test_every_stage_logs_the_same_figures_to_tensorboard_metrics_jsonl_and_its_history(kind, tracked, tiny_base):
    entry, run_dir = tracked(kind)
    assert entry.manifest["tracking"]["metrics"] == str((run_dir / "metrics.jsonl").resolve())
    assert entry.manifest["tracking"]["tensorboard"] == str((run_dir / "tensorboard").resolve())
    assert set(entry.manifest["tracking"]) == {"metrics", *TRACKERS}
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps))  # one line per step, in order

    history = _loss_history(entry, kind)
    assert by_step(records, HEADLINE[kind][1]) == history
    events = tb_events(run_dir / "tensorboard")
    assert tb_scalars(events, HEADLINE[kind][0]) == pytest.approx(history, rel=1e-6)

    assert entry.ref == "tiny/" + kind + "@1" and entry.ref in tb_text(events, "entry")
    stage = tb_text(events, "stage")
    assert entry.manifest["config_hash"] in stage and str(tiny_base) in stage
    assert json.loads(tb_text(events, "config").strip("`\n")) == entry.manifest["config"]
    assert entry.manifest["config"]["report"] == TRACKERS
    hparams = tb_hparams(run_dir / "tensorboard")
    assert hparams["lr"] == pytest.approx(COMMON["lr"]) and json.loads(hparams["report"]) == TRACKERS
    assert hparams["lineage.config_hash"] == entry.manifest["config_hash"]
    assert hparams["lineage.data_hash"] == entry.manifest["data"]["train"]["fingerprint"]
    assert sorted(events.Tags()["images"]) == [f"images/{name[:-4]}" for name in _pictures(entry)]


@pytest.mark.parametrize("kind", KINDS)
def test_wandb_offline_run_holds_every_steps_figure_the_config_and_the_entry(kind, tracked):
    _needs("wandb")
    entry, run_dir = tracked(kind)
    record = entry.manifest["tracking"]["wandb"]
    assert record["mode"] == "offline" and record["project"] == "tiny"
    run = wandb_run(run_dir, record["run_id"])
    assert [str(a.resolve()) for a in run["attempts"]] == [record["dir"]]
    assert [(r.run_id, r.display_name, r.run_group, list(r.tags)) for r in run["runs"]] == [
        (record["run_id"], f"tiny/{kind}", "tiny", ["tiny-test"])]

    assert run["x_axis"] == {"*": "step"}  # every figure plotted against the training step
    assert wandb_points(run["history"], HEADLINE[kind][0]) == pytest.approx(_loss_history(entry, kind), rel=1e-6)
    evaluation = by_step(read_metrics(run_dir / "metrics.jsonl"), "heldout/eval_loss")
    assert wandb_points(run["history"], "heldout/eval_loss") == pytest.approx(evaluation, rel=1e-6)
    config = run["config"]
    assert config["lr"] == pytest.approx(COMMON["lr"]) and config["report"] == TRACKERS
    assert config["lora"] == entry.manifest["config"]["lora"]
    assert config["lineage"]["config_hash"] == entry.manifest["config_hash"]
    assert config["lineage"]["data_hash"] == entry.manifest["data"]["train"]["fingerprint"]
    assert config["tracking"] == TRACKING
    assert run["summary"]["entry"] == entry.ref
    images = {key[len("images/"):]: value for row in run["history"] for key, value in row.items()
              if key.startswith("images/")}
    assert sorted(f"{name}.png" for name in images) == _pictures(entry)
    assert all(value["_type"] == "image-file" and (run["attempts"][0] / "files" / value["path"]).is_file()
               for value in images.values())


@pytest.mark.parametrize("kind", KINDS)
def test_mlflow_run_holds_every_steps_figure_the_params_and_the_entry(kind, tracked):
    _needs("mlflow")
    from mlflow.tracking import MlflowClient

    entry, run_dir = tracked(kind)
    record = entry.manifest["tracking"]["mlflow"]
    assert record["tracking_uri"] == (run_dir / "mlruns").resolve().as_uri() and record["experiment"] == "tiny"
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.experiment_id == record["experiment_id"]

    headline = mlflow_name(HEADLINE[kind][0], file_store=True)  # `train.loss`: a file store's name for it
    assert mlflow_points(client, run.info.run_id, headline) == pytest.approx(_loss_history(entry, kind))
    params, tags = run.data.params, run.data.tags
    assert float(params["lr"]) == pytest.approx(COMMON["lr"]) and json.loads(params["report"]) == TRACKERS
    assert json.loads(params["lora.r"]) == entry.manifest["config"]["lora"]["r"]
    assert params["lineage.config_hash"] == entry.manifest["config_hash"]
    assert params["lineage.data_hash"] == entry.manifest["data"]["train"]["fingerprint"]
    assert tags["align.entry"] == entry.ref and tags["mlflow.runName"] == f"tiny/{kind}" and "tiny-test" in tags
    artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "images"))
    assert artifacts == [f"images/{name}" for name in _pictures(entry)]


@pytest.mark.parametrize("kind", KINDS)
def test_every_tracker_shows_the_figures_under_the_same_names(kind, tracked):
    _needs("wandb")
    _needs("mlflow")
    from mlflow.tracking import MlflowClient

    entry, run_dir = tracked(kind)
    tensorboard = set(tb_events(run_dir / "tensorboard").Tags()["scalars"])
    wandb = {key for row in wandb_run(run_dir, entry.manifest["tracking"]["wandb"]["run_id"])["history"]
             for key in row if key != "step" and not key.startswith("images/")}
    record = entry.manifest["tracking"]["mlflow"]
    mlflow = set(MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).data.metrics)
    assert HEADLINE[kind][0] in tensorboard and any(name.startswith("heldout/") for name in tensorboard)
    assert tensorboard == wandb and {mlflow_name(name, file_store=True) for name in tensorboard} == mlflow


def test_a_resumed_run_continues_each_trackers_run_and_logs_each_step_once(tmp_path, tiny_base, monkeypatch):
    stage = {"report": TRACKERS, "max_steps": 5, "tracking": TRACKING}
    run_killed_at_step_4(tmp_path, tiny_base, stage, monkeypatch)
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]  # checkpoint-2 saved
    first = json.loads((run_dir / "tracking.json").read_text())
    monkeypatch.undo()

    entry = run_stage(tmp_path, tiny_base, "sft", stage)
    assert entry.manifest["timings"]["resumed_from"].endswith("checkpoint-2")
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    history = by_step(entry.manifest["history"], "loss")
    assert by_step(records, "loss") == history and sorted(history) == [1, 2, 3, 4, 5]
    assert tb_scalars(tb_events(run_dir / "tensorboard"), "train/loss") == pytest.approx(history, rel=1e-6)
    tracking = entry.manifest["tracking"]
    if "wandb" in TRACKERS:
        assert first["wandb"]["last_step"] == 3 and tracking["wandb"]["run_id"] == first["wandb"]["run_id"]
        run = wandb_run(run_dir, first["wandb"]["run_id"])
        assert len(run["attempts"]) == 2  # offline, each attempt writes its own folder of the same run
        assert tracking["wandb"]["dirs"] == [str(a.resolve()) for a in run["attempts"]]
        assert wandb_points(run["history"], "train/loss") == pytest.approx(history, rel=1e-5)
        assert sorted(wandb_points(run["history"], "heldout/eval_loss")) == [0, 5]
    if "mlflow" in TRACKERS:
        from mlflow.tracking import MlflowClient

        assert tracking["mlflow"]["run_id"] == first["mlflow"]["run_id"]
        client = MlflowClient(tracking["mlflow"]["tracking_uri"])
        assert mlflow_points(client, first["mlflow"]["run_id"], "train.loss") == pytest.approx(history, rel=1e-5)
        assert client.get_run(first["mlflow"]["run_id"]).info.status == "FINISHED"
    assert set(json.loads((run_dir / "tracking.json").read_text())) == set(TRACKERS) - {"tensorboard"}


# ------------------------------------------------------------------------------------------ plan time


def test_missing_trackers_and_settings_no_tracker_reads_are_plan_problems_at_their_keys(tmp_path, tiny_base,
                                                                                         monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a))
    raw = raw_recipe(tmp_path, tiny_base, "sft", {"report": ["tensorboard", "wandb", "mlflow"]})
    raw["stages"]["sft_tb"] = {**raw["stages"]["sft"], "kind": "sft", "from": "sft", "report": "tensorboard",
                               "tracking": {"tracking_uri": "mlruns", "entity": "me"}}
    with pytest.raises(ConfigError) as err:
        make_plan(validate_recipe(raw, []), Registry(tmp_path / "registry"))
    problems = [str(p) for p in err.value.problems]
    assert 'stages.sft.report: wandb is not installed: pip install "align[wandb]"' in problems
    assert 'stages.sft.report: mlflow is not installed: pip install "align[mlflow]"' in problems
    assert ("stages.sft_tb.tracking.tracking_uri: only mlflow reads `tracking_uri`, and this stage reports to "
            "tensorboard; add mlflow to `report` or remove `tracking_uri`") in problems
    assert any(p.startswith("stages.sft_tb.tracking.entity: only wandb reads `entity`") for p in problems)


def test_wandb_online_without_credentials_is_a_plan_problem(tmp_path, tiny_base, monkeypatch):
    _needs("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    raw = raw_recipe(tmp_path, tiny_base, "sft", {"report": "wandb", "tracking": {"offline": False}})
    with pytest.raises(ConfigError) as err:
        make_plan(validate_recipe(raw, []), Registry(tmp_path / "registry"))
    assert [str(p) for p in err.value.problems] == [
        ("stages.sft.tracking.offline: W&B online needs credentials: run `wandb login` or set WANDB_API_KEY, or "
         "leave `offline` unset to log offline when none are found")]


def test_models_show_says_where_each_trackers_run_is(tracked, capsys):
    from align.cli.main import main

    _needs("wandb")
    _needs("mlflow")
    entry, _ = tracked("sft")
    capsys.readouterr()
    assert main(["--registry", str(entry.path.parents[2]), "models", "show", entry.ref]) == 0
    _, err = capsys.readouterr()
    wandb, mlflow = entry.manifest["tracking"]["wandb"], entry.manifest["tracking"]["mlflow"]
    assert f"wandb: offline run {wandb['run_id']} in {wandb['dir']}  (wandb sync {wandb['dir']})" in err
    assert (f"mlflow: run {mlflow['run_id']} in {mlflow['tracking_uri']}  (MLFLOW_ALLOW_FILE_STORE=true mlflow ui "
            f"--backend-store-uri {mlflow['tracking_uri']})") in err
