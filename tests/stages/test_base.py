"""What every stage shares (`align.stages.base`), tested on the SFT, reward and DPO stages alike: a run
stopped mid-epoch with gradient accumulation resumes to the same per-step losses and the same final weights
as an uninterrupted run; the same seed gives the same loss curve and another seed another one; a changed
seed, batch size or data file is refused on resume unless forced; a save that crashes midway leaves the
previous checkpoint in use; SIGTERM checkpoints and exits, and the next run resumes from there."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.errors import TrainingError
from align.pipeline.run import run_recipe
from align.config.loading import validate_recipe
from align.registry.store import Registry
from align.stages.run_folder import latest_checkpoint, prepare_run_dir
from tests.conftest import REPO_ROOT, SFT_ROWS, write_jsonl

KINDS = ["sft", "reward", "dpo"]
PAIRS = [{"prompt": f"Question {i}: can you help?", "chosen": ["Sure, glad to help.", "Of course."][i % 2],
          "rejected": ["No. Go away.", "Leave me alone."][i % 3 % 2]} for i in range(24)]
# Mid-epoch with accumulation: 2 rows x 2 micro-batches per step; 12 SFT / 18 pair training rows per epoch,
# so the checkpoint at step 2 falls inside the first epoch and the run crosses into the second.
COMMON = {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "save_steps": 2, "logging_steps": 1, "lr": 5e-3,
          "eval_split": 0.25, "warmup_ratio": 0.0, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
CRASH_AT = 4  # the first micro-batch of step 4: checkpoint-2 is the last complete one


class Crash(Exception):
    """Stands for a process dying mid-step."""


def _raw(folder: Path, base, kind: str, stage: dict | None = None) -> dict:
    body = {"sft": {"data": str(write_jsonl(folder / "sft.jsonl", SFT_ROWS))},
            "reward": {"data": str(write_jsonl(folder / "prefs.jsonl", PAIRS)), "gate": {"min_accuracy": 0.0}},
            "dpo": {"data": str(write_jsonl(folder / "prefs.jsonl", PAIRS))}}[kind]
    return {"name": "tiny", "base": str(base), "stages": {kind: {**body, **COMMON, **(stage or {})}},
            "eval": {"metrics": ["loss"]}}


def _run(folder: Path, base, kind: str, stage: dict | None = None, crash_at: int | None = None):
    """Run one stage; returns (every training micro-batch's (step, loss), the entry or None after a crash).
    Losses are read where the stage checks them for finiteness, unrounded (the logged ones are rounded)."""
    import align.stages.callbacks as stage_base

    module = importlib.import_module(f"align.stages.{kind}")
    real, losses = stage_base.check_finite, []

    def record(value: float, step: int) -> None:
        if step == crash_at:
            raise Crash(f"killed at step {step}")
        losses.append((step, value))
        real(value, step)

    recipe = validate_recipe(_raw(folder, base, kind, stage), [], source=str(folder / "r.yaml"))
    registry = Registry(folder / "registry")
    with pytest.MonkeyPatch.context() as patch:
        for holder in (stage_base, module):  # stages import it by name, or from base when they build their trainer
            if hasattr(holder, "check_finite"):
                patch.setattr(holder, "check_finite", record)
        if crash_at is not None:
            with pytest.raises(Crash):
                run_recipe(recipe, registry, runs_root=folder / "runs")
            return losses, None
        run_recipe(recipe, registry, runs_root=folder / "runs")
    return losses, registry.resolve(f"tiny/{kind}")


def _weights(entry) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(entry.path.rglob("*.safetensors")):
        tensors.update({f"{path.relative_to(entry.path)}:{k}": v for k, v in load_file(str(path)).items()})
    assert tensors, f"no weights in {entry.path}"
    return tensors


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_base):
    """The uninterrupted run of each stage kind, made once."""
    runs = {}

    def get(kind: str):
        if kind not in runs:
            runs[kind] = _run(tmp_path_factory.mktemp(f"straight-{kind}"), tiny_base, kind)
        return runs[kind]

    return get


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_killed_mid_epoch_resumes_to_the_same_losses_and_weights(kind, straight, tmp_path, tiny_base):
    losses, entry = straight(kind)
    steps = [s for s, _ in losses]
    assert steps == sorted(steps) and set(steps) == {1, 2, 3, 4, 5, 6}
    assert steps[:6] == [1, 1, 2, 2, 3, 3]  # 2 micro-batches a step (an epoch's last step may have one)

    before, none = _run(tmp_path, tiny_base, kind, crash_at=CRASH_AT)
    assert none is None and [s for s, _ in before] == [1, 1, 2, 2, 3, 3]
    run_dir = tmp_path / "runs" / "tiny" / kind
    assert latest_checkpoint(run_dir) == run_dir / "checkpoint-2"

    after, resumed = _run(tmp_path, tiny_base, kind)
    assert resumed.manifest["timings"]["resumed_from"] == str(run_dir / "checkpoint-2")
    # The resumed run redoes steps 3.. from the checkpoint; every micro-batch loss matches, unrounded.
    expected = [(s, v) for s, v in losses if s >= 3]
    assert [s for s, _ in after] == [s for s, _ in expected]
    assert [v for _, v in after] == pytest.approx([v for _, v in expected], abs=1e-6, rel=0)
    assert [v for _, v in before] == pytest.approx([v for s, v in losses if s < CRASH_AT], abs=1e-6, rel=0)
    history = [[h["loss"] for h in e.manifest["history"] if "loss" in h] for e in (entry, resumed)]
    assert history[0] == history[1] and len(history[0]) == 6
    a, b = _weights(entry), _weights(resumed)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"final weights differ by {worst}"


# ------------------------------------------------------------------------------------------ seeds


def test_the_same_seed_gives_the_same_curve_and_another_seed_another(straight, tmp_path, tiny_base):
    losses, _ = straight("sft")
    again, _ = _run(tmp_path / "again", tiny_base, "sft")
    assert again == losses  # bit for bit
    other, _ = _run(tmp_path / "other", tiny_base, "sft", {"seed": 1})
    assert [s for s, _ in other] == [s for s, _ in losses]
    assert max(abs(a - b) for (_, a), (_, b) in zip(other, losses)) > 1e-3


# ------------------------------------------------------------------------------------------ refused resume


@pytest.mark.parametrize("change, named", [
    ({"seed": 1}, "seed"),
    ({"batch_size": 4}, "batch_size"),
    ({"grad_accum": 1}, "grad_accum"),
    ("data", "data"),
])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_resuming_with_a_changed_seed_batch_or_data_is_refused_unless_forced(kind, change, named, straight,
                                                                             tmp_path, tiny_base):
    import shutil

    _, entry = straight(kind)
    folder = tmp_path / "rerun"
    shutil.copytree(entry.path.parents[3] / "runs", folder / "runs")  # the finished run's folder
    stage = dict(change) if isinstance(change, dict) else {}
    raw = _raw(folder, tiny_base, kind, stage)
    if change == "data":  # one row more in the training file
        rows = SFT_ROWS if kind == "sft" else PAIRS
        write_jsonl(Path(raw["stages"][kind]["data"]), rows + rows[:1])
    recipe = validate_recipe(raw, [], source=str(folder / "r.yaml"))
    registry = Registry(folder / "registry")
    run_json = folder / "runs" / "tiny" / kind / "run.json"
    recorded = run_json.read_text()
    with pytest.raises(TrainingError, match=rf"different [a-z_, ]*\b{named}\b") as info:
        run_recipe(recipe, registry, runs_root=folder / "runs")
    assert "--force" in str(info.value)
    assert run_json.read_text() == recorded and registry.list() == []
    assert latest_checkpoint(run_json.parent) is not None  # nothing discarded without --force


# ------------------------------------------------------------------------------------------ finished runs


@pytest.mark.parametrize("kind", KINDS)
def test_rerunning_a_finished_stage_reports_its_entry_and_registers_nothing(kind, straight, tmp_path, tiny_base):
    """A finished run's folder records the entry it registered, with the config hash, so running the same stage
    again reports that entry: it used to resume from the last checkpoint, train one step past max_steps and
    register a copy. `--force` trains it again from the start."""
    import shutil

    _, entry = straight(kind)
    source, folder = entry.path.parents[3], tmp_path / "rerun"
    shutil.copytree(source / "runs", folder / "runs")
    shutil.copytree(source / "registry", folder / "registry")
    recipe = validate_recipe(_raw(source, tiny_base, kind), [], source=str(source / "r.yaml"))
    registry = Registry(folder / "registry")

    again = run_recipe(recipe, registry, runs_root=folder / "runs")[kind]
    assert again.ref == entry.ref and registry.versions(f"tiny/{kind}") == [entry.version]
    record = json.loads((folder / "runs" / "tiny" / kind / "registered.json").read_text())
    assert record["entry"] == entry.ref and record["config_hash"] == entry.manifest["config_hash"]

    forced = run_recipe(recipe, registry, runs_root=folder / "runs", force=True)[kind]
    assert forced.version == entry.version + 1
    assert forced.manifest["timings"]["steps"] == COMMON["max_steps"]
    assert forced.manifest["timings"]["resumed_from"] is None


def test_a_finished_run_whose_entry_is_gone_trains_again_from_the_start(straight, tmp_path, tiny_base):
    """Its run folder in hand but not its entry (another registry): the run trains afresh to max_steps, not on
    from its final checkpoint."""
    import shutil

    _, entry = straight("sft")
    source = entry.path.parents[3]
    shutil.copytree(source / "runs", tmp_path / "runs")
    recipe = validate_recipe(_raw(source, tiny_base, "sft"), [], source=str(source / "r.yaml"))
    fresh = run_recipe(recipe, Registry(tmp_path / "registry"), runs_root=tmp_path / "runs")["sft"]
    assert fresh.ref == "tiny/sft@1" and fresh.manifest["timings"]["steps"] == COMMON["max_steps"]
    assert fresh.manifest["timings"]["resumed_from"] is None


# ------------------------------------------------------------------------------------------ nothing to train


@pytest.mark.parametrize("kind", ["sft", "reward", "dpo", "ppo"])
def test_a_stage_that_would_train_no_parameters_is_refused_before_training(kind, tmp_path, tiny_base, monkeypatch):
    """Every stage counts its trainable parameters before its first step: none is an error naming the stage, and
    nothing is registered (SFT and DPO failed at step 1 on autograd; PPO registered an untouched copy)."""
    from align.stages import stage_class

    kind_class = stage_class(kind)
    real = kind_class.build

    def frozen(self):
        model, peft_cfg = real(self)
        return model.requires_grad_(False), peft_cfg

    monkeypatch.setattr(kind_class, "build", frozen)
    stage = {"method": "full", "max_steps": 2}
    if kind == "ppo":
        stage.update(rollout_batch=4, minibatch=4, batch_size=4, generation={"max_new_tokens": 4})
    ctx = _context(tmp_path, tiny_base, kind, stage)
    with pytest.raises(TrainingError, match=rf"stages\.{kind}: method full on .* leaves 0 of [\d,]+ parameters "
                                            "trainable"):
        kind_class(ctx).run()
    assert ctx.registry.list() == []


def test_prepare_run_dir_names_each_changed_part(tmp_path):
    fingerprint = {"config": "c", "data": "d", "seed": 0, "batch_size": 8, "grad_accum": 1}
    assert prepare_run_dir(tmp_path, fingerprint, force=False) is None
    for key, value in [("data", "other"), ("batch_size", 4), ("grad_accum", 2), ("seed", 3)]:
        with pytest.raises(TrainingError, match=rf"different {key};"):
            prepare_run_dir(tmp_path, {**fingerprint, key: value}, force=False)
    # A run folder written before a part was recorded is not refused for lacking it.
    assert prepare_run_dir(tmp_path, {**fingerprint, "tokenizer": "t"}, force=False) is None


# ------------------------------------------------------------------------------------------ crash while saving


@pytest.mark.parametrize("where", ["weights", "trainer_state"])
def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_in_use(where, tmp_path, tiny_base, monkeypatch):
    """The save of checkpoint-4 dies midway (in the weights, or half-way through trainer_state.json, the
    file written last); checkpoint-2 stays the one resumed from and the rerun ends like an uninterrupted run."""
    from transformers import Trainer, TrainerState

    real_save_model, real_save_json = Trainer.save_model, TrainerState.save_to_json

    def save_model(self, output_dir=None, _internal_call=False):
        if output_dir and output_dir.endswith("checkpoint-4"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "adapter_model.safetensors").write_bytes(b"\0" * 100)  # a torn write
            raise Crash("killed while writing weights")
        return real_save_model(self, output_dir, _internal_call)

    def save_to_json(self, json_path):
        if json_path.endswith(os.path.join("checkpoint-4", "trainer_state.json")):
            Path(json_path).write_text(json.dumps({"global_step": 4, "log_history": []})[:20])  # truncated
            raise Crash("killed while writing trainer_state.json")
        return real_save_json(self, json_path)

    if where == "weights":
        monkeypatch.setattr(Trainer, "save_model", save_model)
    else:
        monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)
    recipe = validate_recipe(_raw(tmp_path, tiny_base, "sft"), [], source=str(tmp_path / "r.yaml"))
    registry = Registry(tmp_path / "registry")
    with pytest.raises(Crash):
        run_recipe(recipe, registry, runs_root=tmp_path / "runs")
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    assert (run_dir / "checkpoint-4").is_dir()  # the torn folder is there ...
    assert latest_checkpoint(run_dir) == run_dir / "checkpoint-2"  # ... and passed over
    monkeypatch.undo()
    run_recipe(recipe, registry, runs_root=tmp_path / "runs")
    entry = registry.resolve("tiny/sft")
    assert entry.manifest["timings"]["resumed_from"] == str(run_dir / "checkpoint-2")
    assert entry.manifest["timings"]["steps"] == 6


# ------------------------------------------------------------------------------------------ SIGTERM

# `align run` with every training step slowed to ~0.3 s, so that the signal lands mid-run on any machine.
_SLOW_ALIGN = ("import sys, time\nimport align.stages.callbacks as base, align.stages.sft as sft\n"
               "real = base.check_finite\n"
               "def slow(value, step):\n    time.sleep(0.3)\n    real(value, step)\n"
               "base.check_finite = slow\nif hasattr(sft, 'check_finite'):\n    sft.check_finite = slow\n"
               "from align.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
GRACE_SECONDS = 30


def test_sigterm_checkpoints_and_exits_and_the_next_run_resumes(tmp_path, tiny_base):
    raw = _raw(tmp_path, tiny_base, "sft", {"max_steps": 12, "save_steps": 100, "eval_split": 0.0})
    raw["registry"] = str(tmp_path / "registry")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "first.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_ALIGN, "run", "r.yaml"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "/12: loss " not in (tmp_path / "first.log").read_text():  # the first step's console line
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training step within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.wait(timeout=GRACE_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - signalled < GRACE_SECONDS
    output = (tmp_path / "first.log").read_text()
    assert code == 2 and "interrupted at step" in output and "Traceback" not in output, output[-3000:]
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None, output[-3000:]
    step = int(checkpoint.name.split("-")[1])
    assert 1 <= step < 12
    assert not (tmp_path / "registry" / "tiny").exists()  # nothing registered by the interrupted run

    rerun = subprocess.run([sys.executable, "-m", "align.cli.main", "run", "r.yaml"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    entry = Registry(tmp_path / "registry").resolve("tiny/sft")
    assert entry.manifest["timings"]["resumed_from"] == str(Path("runs") / "tiny" / "sft" / checkpoint.name)
    assert entry.manifest["timings"]["steps"] == 12


# ------------------------------------------------------------------------------------------ tokenizer lineage

OTHER_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _context(folder: Path, base, kind: str, stage: dict, parent=None):
    from align.models.loading import ModelSource
    from align.stages.context import StageContext

    raw = _raw(folder, base, kind, stage) if kind != "ppo" else {
        "name": "tiny", "base": str(base), "eval": {"metrics": ["loss"]},
        "stages": {"ppo": {"prompts": str(write_jsonl(folder / "prompts.jsonl", [{"prompt": "1 + 1?"}] * 8)),
                           "rewards": [{"checker": "regex", "args": {"pattern": "[0-9]"}}], **stage}}}
    recipe = validate_recipe(raw, [], source=str(folder / "r.yaml"))
    parent = parent or ModelSource(ref=str(base), kind="local", path=str(base))
    return StageContext(recipe=recipe, name=kind, config=recipe.stages[kind], registry=Registry(folder / "registry"),
                        parent=parent, runs_root=folder / "runs")


@pytest.mark.parametrize("kind", ["reward", "dpo", "ppo"])
def test_a_stage_refuses_to_run_on_a_parent_with_another_template_unless_allowed(kind, tmp_path, tiny_base):
    """The stage's own check when it runs (the plan refuses the same earlier; this holds for parents the plan
    cannot read, and for `align.pipeline.run` callers that skip it)."""
    from align.stages.building import stage_tokenizer

    from align.stages import stage_class

    with pytest.raises(TrainingError) as info:
        stage_class(kind)(_context(tmp_path, tiny_base, kind, {"chat_template": OTHER_TEMPLATE})).run()
    message = str(info.value)
    assert f"stages.{kind}:" in message and "chat-template hash" in message and "allow_template_mismatch" in message
    assert not (tmp_path / "runs").exists()  # refused before the run folder, data or weights
    allowed = _context(tmp_path, tiny_base, kind, {"chat_template": OTHER_TEMPLATE, "allow_template_mismatch": True})
    assert stage_tokenizer(allowed).chat_template == OTHER_TEMPLATE


@pytest.mark.parametrize("kind", ["reward", "dpo", "ppo"])
def test_a_stage_refuses_a_parent_entry_whose_tokenizer_changed(kind, tmp_path, tiny_base):
    """A parent entry whose tokenizer no longer hashes to what its manifest recorded (another vocabulary or
    template put in its folder) is refused, naming both hashes."""
    from align.models.loading import ModelSource
    from align.stages.building import stage_tokenizer
    from tests.tiny_entries import register_adapter

    registry = Registry(tmp_path / "registry")
    entry = register_adapter(registry, tiny_base)
    manifest_path = entry.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    recorded = manifest["tokenizer"]["hash"]
    manifest["tokenizer"]["hash"] = "0" * len(recorded)  # as if trained with another tokenizer
    manifest_path.write_text(json.dumps(manifest))
    parent = ModelSource(ref=entry.ref, kind="registry", entry=registry.resolve(entry.ref))
    with pytest.raises(TrainingError, match=rf"tokenizer hash {'0' * len(recorded)} \(parent\) vs {recorded}"):
        stage_tokenizer(_context(tmp_path, tiny_base, kind, {}, parent=parent))
