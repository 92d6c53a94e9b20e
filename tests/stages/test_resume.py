"""Resuming right (`align.stages.resume`): a complete checkpoint with a truncated file is passed over for the
previous whole one, named, and the run still ends like an uninterrupted one; a refused resume names the
config keys that changed; a resumed run records the whole run's `train_loss` (also when it resumed from the
final checkpoint); a full disk while saving a checkpoint is one clear error and loses nothing."""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from align.errors import TrainingError
from align.pipeline.run import run_recipe
from align.config.loading import validate_recipe
from align.registry.store import Registry
from align.stages.run_folder import latest_checkpoint, prepare_run_dir
from tests.conftest import SFT_ROWS, write_jsonl

STAGE = {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "save_steps": 2, "logging_steps": 1, "lr": 5e-3,
         "eval_split": 0.25, "warmup_ratio": 0.0, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}


class Crash(Exception):
    """Stands for a process dying."""


def _recipe(folder: Path, base, stage: dict | None = None):
    raw = {"name": "tiny", "base": str(base), "eval": {"metrics": ["loss"]},
           "stages": {"sft": {"data": str(write_jsonl(folder / "sft.jsonl", SFT_ROWS)), **STAGE, **(stage or {})}}}
    return validate_recipe(raw, [], source=str(folder / "r.yaml"))


def _run(folder: Path, base, stage: dict | None = None, crash_at: int | None = None):
    """Run the SFT stage; with `crash_at`, die at the first micro-batch of that step (after the checkpoints
    before it were written). Returns the entry, or None after the crash."""
    import align.stages.callbacks as stage_base

    registry = Registry(folder / "registry")
    real = stage_base.check_finite

    def check(value: float, step: int) -> None:
        if step == crash_at:
            raise Crash(f"killed at step {step}")
        real(value, step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage_base, "check_finite", check)
        if crash_at is not None:
            with pytest.raises(Crash):
                run_recipe(_recipe(folder, base, stage), registry, runs_root=folder / "runs")
            return None
        run_recipe(_recipe(folder, base, stage), registry, runs_root=folder / "runs")
    return registry.resolve("tiny/sft")


def _weights(entry) -> dict[str, torch.Tensor]:
    return load_file(str(entry.path / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_base):
    """The uninterrupted run, made once."""
    return _run(tmp_path_factory.mktemp("straight"), tiny_base)


# ------------------------------------------------------------------------------------------ damaged checkpoints


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_whole_one(damaged, straight, tmp_path, tiny_base,
                                                                        caplog):
    assert _run(tmp_path, tiny_base, crash_at=6) is None
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    assert latest_checkpoint(run_dir) == run_dir / "checkpoint-4"  # complete: trainer_state.json is whole
    path = run_dir / "checkpoint-4" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with caplog.at_level(logging.WARNING, logger="align.stages.resume"):
        resumed = _run(tmp_path, tiny_base)
    assert resumed.manifest["timings"]["resumed_from"] == str(run_dir / "checkpoint-2")
    assert f"checkpoint-4 is damaged ({damaged}: truncated" in caplog.text, caplog.text
    assert (run_dir / "damaged" / "checkpoint-4" / damaged).is_file()  # kept, out of the way
    a, b = _weights(straight), _weights(resumed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


# ------------------------------------------------------------------------------------------ refused resume


def test_a_refused_resume_names_the_config_keys_that_changed(straight, tmp_path, tiny_base):
    shutil.copytree(straight.path.parents[3] / "runs", tmp_path / "runs")
    with pytest.raises(TrainingError) as info:
        _run(tmp_path, tiny_base, {"lr": 1e-3, "lora": {"r": 8, "alpha": 8, "dropout": 0.0}})
    message = str(info.value)
    assert "different config (config: " in message and "--force" in message, message
    assert "lora.r 4 -> 8, lr 0.005 -> 0.001);" in message, message  # data.path too: the folder was copied


def test_prepare_run_dir_names_changed_config_keys_and_many_briefly(tmp_path):
    fingerprint = {"config": "c", "data": "d"}
    settings = {f"k{i}": i for i in range(9)}
    prepare_run_dir(tmp_path, fingerprint, force=False, settings=settings)
    with pytest.raises(TrainingError, match=r"different config \(config: k0 0 -> 1, k1 1 -> 2, k2 2 -> 3, "
                                            r"k3 3 -> 4, k4 4 -> 5, k5 5 -> 6 and 3 more\);"):
        prepare_run_dir(tmp_path, {**fingerprint, "config": "c2"}, force=False,
                        settings={k: v + 1 for k, v in settings.items()})
    with pytest.raises(TrainingError, match=r"different config; resuming"):  # no settings: the key alone
        prepare_run_dir(tmp_path, {**fingerprint, "config": "c2"}, force=False)


# ------------------------------------------------------------------------------------------ train_loss


def test_a_resumed_run_records_the_whole_runs_train_loss(straight, tmp_path, tiny_base):
    expected = straight.manifest["metrics"]["train_loss"]
    assert expected > 0
    assert _run(tmp_path / "mid", tiny_base, crash_at=4) is None  # resumes from checkpoint-2
    mid = _run(tmp_path / "mid", tiny_base)
    assert mid.manifest["timings"]["resumed_from"].endswith("checkpoint-2")
    assert mid.manifest["metrics"]["train_loss"] == pytest.approx(expected, rel=1e-6)


def test_a_run_resumed_from_its_final_checkpoint_records_the_whole_runs_train_loss(straight, tmp_path, tiny_base,
                                                                                   monkeypatch):
    expected = straight.manifest["metrics"]["train_loss"]

    def crash(*args, **kwargs):
        raise Crash("killed while registering")

    monkeypatch.setattr(Registry, "create", crash)  # trained to the end, checkpoint-6 written, not registered
    with pytest.raises(Crash):
        run_recipe(_recipe(tmp_path, tiny_base), Registry(tmp_path / "registry"), runs_root=tmp_path / "runs")
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    assert latest_checkpoint(run_dir) == run_dir / "checkpoint-6"
    final = _run(tmp_path, tiny_base)
    assert final.manifest["timings"]["resumed_from"] == str(run_dir / "checkpoint-6")
    assert final.manifest["metrics"]["train_loss"] == pytest.approx(expected, rel=1e-6)


def test_whole_run_loss_weights_each_log_by_the_steps_it_covers():
    from align.stages.resume import whole_run_loss

    history = [{"step": 1, "loss": 4.0}, {"step": 3, "loss": 2.0}, {"step": 3, "eval_loss": 9.0},
               {"step": 4, "loss": 1.0}]
    assert whole_run_loss(history, resumed_at=0, steps=4, this_run_loss=1.5) == 1.5  # fresh: Trainer's own
    assert whole_run_loss(history, resumed_at=3, steps=4, this_run_loss=1.0) == pytest.approx((4 + 4 + 1) / 4)
    assert whole_run_loss(history, resumed_at=4, steps=4, this_run_loss=0.0) == pytest.approx((4 + 4 + 1) / 4)


# ------------------------------------------------------------------------------------------ full disk


def test_a_full_disk_while_saving_a_checkpoint_is_one_clear_error(tmp_path, tiny_base, monkeypatch):
    from transformers import Trainer

    from align.errors import DiskFullError

    real = Trainer.save_model

    def full(self, output_dir=None, _internal_call=False):
        if output_dir and output_dir.endswith("checkpoint-4"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "adapter_model.safetensors"))
        return real(self, output_dir, _internal_call)

    monkeypatch.setattr(Trainer, "save_model", full)
    with pytest.raises(DiskFullError) as info:
        run_recipe(_recipe(tmp_path, tiny_base), Registry(tmp_path / "registry"), runs_root=tmp_path / "runs")
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    size = sum(f.stat().st_size for f in (run_dir / "checkpoint-2").rglob("*") if f.is_file())
    message = str(info.value)
    assert f"no space left on device writing {run_dir / 'checkpoint-4' / 'adapter_model.safetensors'}" in message
    assert f"needs about {size / 2**20:.1f} MB" in message or f"needs about {size / 2**10:.1f} KB" in message, message
    assert "free there" in message and "checkpoint-2, is intact" in message
    assert latest_checkpoint(run_dir) == run_dir / "checkpoint-2"
    assert Registry(tmp_path / "registry").list() == []


def test_a_full_disk_while_saving_a_ppo_checkpoint_is_one_clear_error(tmp_path, monkeypatch):
    import align.stages.ppo as ppo_stage
    from align.errors import DiskFullError

    def full(obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(ppo_stage.torch, "save", full)
    monkeypatch.setattr("align.runtime.diskspace.free_bytes", lambda path: 1024)  # what a full disk has left
    ctx = SimpleNamespace(run_dir=tmp_path / "run")
    trainer = SimpleNamespace(state_dict=lambda: {}, model=torch.nn.Linear(64, 64))
    with pytest.raises(DiskFullError, match=r"writing .*checkpoint-3: it needs about 48.8 KB, 1.0 KB free there\. "
                                            r"Nothing complete was lost: no complete checkpoint was written yet"):
        ppo_stage.save_checkpoint(ctx, trainer, 3, [])
    assert not (ctx.run_dir / "checkpoint-3").exists()
