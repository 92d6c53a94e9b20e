"""The SFT stage end to end on a tiny random Llama: LoRA and full fine-tuning, the manifest's lineage, reload
parity of a registered adapter, refusing to resume a run whose fingerprint changed, non-finite loss."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.data.tokenize import encode_conversation
from align.errors import ConfigError, TrainingError
from align.registry.fingerprint import hash_file, hash_json, tokenizer_facts
from align.models.loading import ModelSource, load_causal_lm, load_tokenizer
from align.pipeline.run import run_recipe
from align.config.loading import validate_recipe
from align.registry.store import Registry
from align.stages.callbacks import check_finite
from align.stages.run_folder import latest_checkpoint, prepare_run_dir


@dataclass
class Run:
    folder: Path
    raw: dict
    recipe: object
    registry: Registry
    runs_root: Path
    entry: object

    @property
    def run_dir(self) -> Path:
        return self.runs_root / self.recipe.name / "sft"


def _train(folder: Path, tiny_raw_recipe, stage: dict | None = None) -> Run:
    raw = tiny_raw_recipe(folder, stage)
    recipe = validate_recipe(raw, [], source=str(folder / "r.yaml"))
    registry = Registry(folder / "registry")
    produced = run_recipe(recipe, registry, runs_root=folder / "runs")
    assert list(produced) == ["sft"]
    # Every check reads the entry back from the registry, not the object the run returned.
    entry = registry.resolve("tiny/sft")
    assert entry.ref == produced["sft"].ref == "tiny/sft@1"
    return Run(folder, raw, recipe, registry, folder / "runs", entry)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_raw_recipe) -> Run:
    return _train(tmp_path_factory.mktemp("lora"), tiny_raw_recipe)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_raw_recipe) -> Run:
    return _train(tmp_path_factory.mktemp("full"), tiny_raw_recipe, {"method": "full"})


def _losses(manifest: dict) -> list[float]:
    return [h["loss"] for h in manifest["history"] if "loss" in h]


def _sample_ids(tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7\n#### 7"}]
    return torch.tensor([encode_conversation(tokenizer, messages, 128).input_ids])


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_adapter_weights_moved_from_initialization(lora_run):
    entry = lora_run.entry
    assert entry.artifact["type"] == "adapter"
    assert entry.artifact["applies_to"] == {"source": "local", "path": str(lora_run.recipe.base)}
    weights = load_file(str(entry.file(entry.artifact["path"], "adapter_model.safetensors")))
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b, f"no lora_B tensors in the saved adapter: {sorted(weights)[:5]}"
    # LoRA initializes B to zero; every trained B must have moved.
    untouched = [k for k, v in lora_b.items() if not torch.any(v != 0)]
    assert not untouched, f"lora_B still zero after training: {untouched}"


def test_lora_training_lowers_train_and_eval_loss(lora_run):
    manifest = lora_run.entry.manifest
    losses = _losses(manifest)
    assert len(losses) == 8, manifest["history"]
    # 13 training rows in batches of 4: steps 1-4 and 5-8 are two epochs over the same rows, batched by length
    # (the last batch of each is the shortest row alone), so epoch means compare and single steps do not.
    assert sum(losses[4:]) < sum(losses[:4]), losses
    metrics, baseline = manifest["metrics"], manifest["baseline"]
    assert baseline["of"] == manifest["parent"]
    assert metrics["eval_loss"] < baseline["metrics"]["eval_loss"]
    # Baseline and result were measured the same way, so they are comparable.
    assert metrics["eval_fingerprint"] == baseline["metrics"]["eval_fingerprint"]
    assert manifest["history"][0] == {"step": 0, "eval_loss": baseline["metrics"]["eval_loss"]}
    assert "math_answer_pass_rate" in metrics and "samples" in metrics
    assert (lora_run.entry.path / "training_curve.png").is_file()


def test_lora_manifest_records_lineage(lora_run, tiny_base):
    entry, recipe = lora_run.entry, lora_run.recipe
    manifest = entry.manifest
    stage = recipe.stages["sft"]
    local_base = {"source": "local", "path": str(tiny_base)}

    assert manifest["kind"] == "policy"
    assert manifest["stage"] == {"name": "sft", "kind": "sft"}
    assert manifest["parent"] == local_base
    assert manifest["base"] == local_base
    adapter = manifest["adapter"]
    assert adapter["method"] == "lora"
    assert (adapter["r"], adapter["alpha"]) == (8, 16)
    assert adapter["targets"] and all(isinstance(t, str) for t in adapter["targets"])
    assert any(t.endswith("q_proj") for t in adapter["targets"])

    base_tokenizer = load_tokenizer(ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base)),
                                    lora_run.registry)
    facts = tokenizer_facts(base_tokenizer)
    assert manifest["tokenizer"]["hash"] == facts["hash"]
    assert manifest["tokenizer"]["chat_template_hash"] == facts["chat_template_hash"] is not None
    assert (entry.path / manifest["tokenizer"]["path"]).is_dir()

    data = manifest["data"]["train"]
    assert data["fingerprint"] == hash_file(stage.data.path)
    assert (data["rows"], data["kept"]) == (16, 16)

    assert manifest["config"] == stage.model_dump(by_alias=True)
    assert manifest["config_hash"] == hash_json(manifest["config"])
    assert {"torch", "transformers", "trl", "peft"} <= set(manifest["versions"])

    timings = manifest["timings"]
    assert timings["steps"] == stage.max_steps == 8
    assert timings["train_tokens"] > 0
    assert timings["tokens_per_second"] > 0
    assert timings["resumed_from"] is None


def test_registered_adapter_reloads_to_the_trained_model(lora_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    entry = lora_run.entry
    tokenizer = load_tokenizer(ModelSource(ref=entry.ref, kind="registry", entry=entry), lora_run.registry)
    ids = _sample_ids(tokenizer)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    trained = PeftModel.from_pretrained(base, str(entry.file(entry.artifact["path"]))).eval()  # not merged
    merged = load_causal_lm(ModelSource(ref=entry.ref, kind="registry", entry=entry), lora_run.registry,
                            dtype="fp32").eval()
    assert not isinstance(merged, PeftModel)
    with torch.no_grad():
        trained_logits = trained(ids).logits
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, trained_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3), "the adapter changed nothing"


# ------------------------------------------------------------------------------------------ full


def test_full_finetune_registers_full_weights_that_changed(full_run, tiny_base):
    entry = full_run.entry
    manifest = entry.manifest
    assert entry.artifact == {"type": "full", "path": "model"}
    assert manifest["adapter"] is None
    assert manifest["kind"] == "policy"
    trained = load_file(str(entry.file("model", "model.safetensors")))
    original = load_file(str(tiny_base / "model.safetensors"))
    common = sorted(set(trained) & set(original))
    assert common and set(trained) == set(original)
    unchanged = [k for k in common if torch.equal(trained[k], original[k])]
    assert not unchanged, f"parameters not updated by full fine-tuning: {unchanged}"
    losses = _losses(manifest)
    assert losses[-1] < losses[0], losses
    assert manifest["metrics"]["eval_loss"] < manifest["baseline"]["metrics"]["eval_loss"]

    model = load_causal_lm(ModelSource(ref=entry.ref, kind="registry", entry=entry), full_run.registry, dtype="fp32")
    loaded = model.state_dict()
    assert torch.equal(loaded["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_full_finetune_from_an_adapter_entry_trains_the_merged_weights(method, tiny_raw_recipe, tiny_base, tmp_path):
    """`method: full` from a LoRA or QLoRA entry: every merged weight trains (PEFT loads the adapter frozen, and
    the stage used to fail at step 1 on 0 trainable parameters), and the entry's full weights moved away from
    the merged parent."""
    from tests.tiny_entries import register_adapter, unmerged

    registry = Registry(tmp_path / "registry")
    parent = register_adapter(registry, tiny_base, name="tiny/adapter", method=method)
    raw = tiny_raw_recipe(tmp_path, {"method": "full", "from": parent.ref, "max_steps": 3})
    recipe = validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))
    entry = run_recipe(recipe, registry, runs_root=tmp_path / "runs")["sft"]
    assert entry.artifact["type"] == "full" and entry.manifest["timings"]["steps"] == 3
    assert entry.manifest["parent"] == {"source": "registry", "ref": parent.ref}
    merged = unmerged(parent).merge_and_unload().state_dict()
    trained = load_file(str(entry.file("model", "model.safetensors")))
    unchanged = [k for k in trained if torch.equal(trained[k], merged[k])]
    assert not unchanged, f"not trained: {unchanged}"


# ------------------------------------------------------------------------------------------ run folder


def test_prepare_run_dir_refuses_a_changed_fingerprint(lora_run, tmp_path):
    run_dir = tmp_path / "sft"
    shutil.copytree(lora_run.run_dir, run_dir)
    fingerprint = json.loads((run_dir / "run.json").read_text())
    assert fingerprint["seed"] == 0

    # Same fingerprint: resume from the newest complete checkpoint.
    assert prepare_run_dir(run_dir, fingerprint, force=False) == run_dir / "checkpoint-8"

    changed = {**fingerprint, "seed": 1}
    with pytest.raises(TrainingError, match=r"different seed") as info:
        prepare_run_dir(run_dir, changed, force=False)
    assert "--force" in str(info.value)
    assert json.loads((run_dir / "run.json").read_text())["seed"] == 0  # left as it was
    assert latest_checkpoint(run_dir) is not None

    assert prepare_run_dir(run_dir, changed, force=True) is None  # discarded: a fresh start
    assert not list(run_dir.glob("checkpoint-*"))
    assert json.loads((run_dir / "run.json").read_text())["seed"] == 1


def test_rerun_with_changed_seed_is_refused_then_forced(lora_run, tmp_path):
    runs_root = tmp_path / "runs"
    shutil.copytree(lora_run.runs_root, runs_root)
    registry = Registry(tmp_path / "registry")
    recipe = validate_recipe(lora_run.raw, ["stages.sft.seed=1"], source=lora_run.recipe.source)

    with pytest.raises(TrainingError, match="seed"):
        run_recipe(recipe, registry, runs_root=runs_root)
    assert registry.list() == []
    run_json = runs_root / "tiny" / "sft" / "run.json"
    assert json.loads(run_json.read_text())["seed"] == 0

    produced = run_recipe(recipe, registry, runs_root=runs_root, force=True)
    entry = registry.resolve("tiny/sft")
    assert entry.ref == produced["sft"].ref
    assert entry.manifest["config"]["seed"] == 1
    assert entry.manifest["timings"]["resumed_from"] is None
    assert json.loads(run_json.read_text())["seed"] == 1


def test_interrupted_run_resumes_from_its_last_checkpoint(lora_run, tmp_path):
    runs_root = tmp_path / "runs"
    shutil.copytree(lora_run.runs_root, runs_root)
    run_dir = runs_root / "tiny" / "sft"
    shutil.rmtree(run_dir / "checkpoint-8")  # as if stopped after the checkpoint at step 5
    (run_dir / "registered.json").unlink()  # and so never registered
    registry = Registry(tmp_path / "registry")
    recipe = validate_recipe(lora_run.raw, [], source=lora_run.recipe.source)

    run_recipe(recipe, registry, runs_root=runs_root)
    resumed = registry.resolve("tiny/sft").manifest
    original = lora_run.entry.manifest
    assert resumed["timings"]["resumed_from"] == str(run_dir / "checkpoint-5")
    assert resumed["timings"]["steps"] == 8
    assert _losses(resumed) == pytest.approx(_losses(original), abs=1e-4)
    assert resumed["metrics"]["eval_loss"] == pytest.approx(original["metrics"]["eval_loss"], abs=1e-4)
    assert resumed["baseline"]["metrics"]["eval_loss"] == original["baseline"]["metrics"]["eval_loss"]


# ------------------------------------------------------------------------------------------ non-finite loss


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_the_step(value):
    with pytest.raises(TrainingError, match="step 3") as info:
        check_finite(value, 3)
    assert "learning rate" in str(info.value)


def test_check_finite_accepts_finite_loss():
    assert check_finite(2.5, 1) is None


def test_exploding_loss_stops_training_and_registers_nothing(tiny_raw_recipe, tmp_path):
    # Adam's first update moves every weight by ~lr, so the second forward pass overflows to nan.
    raw = tiny_raw_recipe(tmp_path, {"method": "full", "lr": 1e38})
    recipe = validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))
    registry = Registry(tmp_path / "registry")
    with pytest.raises(TrainingError, match=r"loss became (nan|inf|-inf) at step 2\b"):
        run_recipe(recipe, registry, runs_root=tmp_path / "runs")
    assert registry.list() == []
    assert not (registry.root / "tiny").exists()
    assert latest_checkpoint(tmp_path / "runs" / "tiny" / "sft") is None


def test_sft_may_set_a_new_chat_template_and_records_it(tiny_raw_recipe, tmp_path, tiny_base):
    """SFT is where a template is chosen: a `chat_template` file replaces the parent's, training uses it, and
    the entry's tokenizer and manifest carry it, so later stages are checked against it."""
    from align.models.tiny import TEMPLATES

    template = tmp_path / "llama2.jinja"
    template.write_text(TEMPLATES["llama2"])
    run = _train(tmp_path, tiny_raw_recipe, {"chat_template": str(template), "max_steps": 2})
    parent_tokenizer = load_tokenizer(ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base)),
                                      run.registry)
    saved = load_tokenizer(ModelSource(ref=run.entry.ref, kind="registry", entry=run.entry), run.registry)
    assert saved.chat_template == TEMPLATES["llama2"] != parent_tokenizer.chat_template
    assert run.entry.manifest["tokenizer"]["chat_template_hash"] == tokenizer_facts(saved)["chat_template_hash"]
    assert run.entry.manifest["tokenizer"]["chat_template_hash"] != tokenizer_facts(parent_tokenizer)[
        "chat_template_hash"]


def test_a_missing_chat_template_file_is_named_before_training(tiny_raw_recipe, tmp_path):
    with pytest.raises(ConfigError, match="stages.sft.chat_template: nowhere.jinja: neither a template nor a read"):
        _train(tmp_path, tiny_raw_recipe, {"chat_template": "nowhere.jinja", "max_steps": 2})
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ --continue, log.txt


def _copy_run(lora_run, tmp_path) -> tuple[Path, Registry]:
    """The finished 8-step run and the registry holding its entry, copied so a test may change them."""
    shutil.copytree(lora_run.runs_root, tmp_path / "runs")
    shutil.copytree(lora_run.registry.root, tmp_path / "registry")
    return tmp_path / "runs", Registry(tmp_path / "registry")


def _run(raw, overrides, registry, runs_root, **kwargs):
    recipe = validate_recipe(raw, overrides, source=str(runs_root.parent / "r.yaml"))
    return run_recipe(recipe, registry, runs_root=runs_root, **kwargs)


def test_continue_trains_a_finished_run_on_as_if_it_had_never_stopped(lora_run, tmp_path):
    """8 steps, then --continue to 12: the same losses as one 12-step run (constant schedule), so the optimizer
    state and the data order carried on; a new version records the entry it continues, the finished run's
    steps unchanged in its history."""
    runs_root, registry = _copy_run(lora_run, tmp_path)
    produced = _run(lora_run.raw, ["stages.sft.max_steps=12"], registry, runs_root, continue_run=True)
    entry = registry.resolve("tiny/sft")
    assert entry.ref == produced["sft"].ref == "tiny/sft@2"
    continues = entry.manifest["continues"]
    assert continues["entry"] == "tiny/sft@1" and continues["from_step"] == 8
    assert continues["changed"] == {"max_steps": [8, 12]}
    assert entry.manifest["timings"]["resumed_from"] == str(runs_root / "tiny" / "sft" / "checkpoint-8")
    assert entry.manifest["timings"]["steps"] == 12
    assert _losses(entry.manifest)[:8] == _losses(lora_run.entry.manifest)

    straight = _train(tmp_path / "straight", lambda folder, stage: lora_run.raw | {"stages": {"sft": {
        **lora_run.raw["stages"]["sft"], "max_steps": 12}}})
    assert _losses(entry.manifest) == pytest.approx(_losses(straight.entry.manifest), abs=1e-4)
    assert entry.manifest["metrics"]["eval_loss"] == pytest.approx(straight.entry.manifest["metrics"]["eval_loss"],
                                                                    abs=1e-4)

    # Once continued, the same command finds the continuation finished: nothing new is registered.
    _run(lora_run.raw, ["stages.sft.max_steps=12"], registry, runs_root, continue_run=True)
    assert registry.versions("tiny/sft") == [1, 2]

    log_text = (runs_root / "tiny" / "sft" / "log.txt").read_text()
    assert log_text.count("==== ") == 3  # the first run, the continuation, the re-run: appended
    assert "continuing tiny/sft@1 from step 8" in log_text and "registered tiny/sft@2" in log_text
    assert "finished already" in log_text


def test_continue_refuses_anything_but_a_longer_run(lora_run, tmp_path):
    runs_root, registry = _copy_run(lora_run, tmp_path)
    with pytest.raises(TrainingError, match=r"--continue: stages.sft: only max_steps, epochs.* may change to "
                                            r"continue tiny/sft@1; changed: lr 0.01 -> 0.001"):
        _run(lora_run.raw, ["stages.sft.max_steps=12", "stages.sft.lr=1e-3"], registry, runs_root, continue_run=True)
    with pytest.raises(TrainingError, match=r"max_steps 6 is not beyond the 8 steps tiny/sft@1 trained"):
        _run(lora_run.raw, ["stages.sft.max_steps=6"], registry, runs_root, continue_run=True)
    # The same length is no continuation: the usual refusal of a changed run.
    with pytest.raises(TrainingError, match=r"holds a run with different config \(config: logging_steps 1 -> 2\)"):
        _run(lora_run.raw, ["stages.sft.logging_steps=2"], registry, runs_root, continue_run=True)
    assert registry.versions("tiny/sft") == [1]
    # Still finished as it was: a plain re-run reports the entry.
    assert _run(lora_run.raw, [], registry, runs_root)["sft"].ref == "tiny/sft@1"


def test_continue_lays_a_decaying_schedule_over_the_new_length(tiny_raw_recipe, tmp_path):
    """Cosine over 4 steps, continued to 8: step 5 trains at the rate a run planned for 8 steps has there
    (half the peak), not at the finished run's last (near 0): the warm restart the docs describe."""
    import math

    first = _train(tmp_path, tiny_raw_recipe, {"scheduler": "cosine", "max_steps": 4, "save_steps": 4})
    _run(first.raw, ["stages.sft.max_steps=8"], first.registry, first.runs_root, continue_run=True)
    rates = {h["step"]: h["learning_rate"] for h in first.registry.resolve("tiny/sft@2").manifest["history"]
             if "learning_rate" in h}
    lr = first.raw["stages"]["sft"]["lr"]
    assert rates[4] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-6)  # the 4-step run's
    assert rates[5] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 4 / 8)), rel=1e-6)  # the 8-step curve's


def test_each_run_folder_has_a_log_file_of_aligns_lines(lora_run):
    text = (lora_run.run_dir / "log.txt").read_text()
    assert "\r" not in text
    first = text.splitlines()[0]
    assert first.startswith("==== ") and "| stage sft |" in first
    assert "stage sft [sft] from" in text
    assert "step 8/8: loss " in text and "learning_rate" in text  # the training figures, one line a logged step
    assert "registered tiny/sft@1" in text


def test_a_failed_stage_ends_its_log_with_the_error(tiny_raw_recipe, tmp_path):
    raw = tiny_raw_recipe(tmp_path, {"method": "full", "lr": 1e38})
    with pytest.raises(TrainingError):
        _run(raw, [], Registry(tmp_path / "registry"), tmp_path / "runs")
    last = (tmp_path / "runs" / "tiny" / "sft" / "log.txt").read_text().splitlines()[-1]
    assert "ERROR align: stage sft stopped: TrainingError: loss became" in last


# ------------------------------------------------------------------------------------------ packing


def test_packed_run_trains_registers_and_says_so(tiny_raw_recipe, tmp_path, monkeypatch):
    """`packing: true` is read: the stage checks the model keeps packed conversations apart, trains on packed
    batches (several conversations a row) and records the setting."""
    import align.data.packing as packing

    shapes, collate = [], packing.PackedCollator.__call__

    def recording(self, features):
        batch = collate(self, features)
        shapes.append((len(features), batch["input_ids"].shape[0]))
        return batch

    monkeypatch.setattr(packing.PackedCollator, "__call__", recording)
    run = _train(tmp_path, tiny_raw_recipe, {"packing": True, "max_steps": 4})
    assert run.entry.manifest["config"]["packing"] is True
    assert shapes and any(rows < conversations for conversations, rows in shapes)
    assert _losses(run.entry.manifest)[-1] < _losses(run.entry.manifest)[0]
    assert "packing conversations into rows of at most" in (run.run_dir / "log.txt").read_text()


def test_packing_on_a_model_that_would_mix_conversations_is_refused(tiny_raw_recipe, tmp_path, monkeypatch):
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(TrainingError, match="stages.sft.packing: the model .* lets packed conversations attend"):
        _train(tmp_path, tiny_raw_recipe, {"packing": True, "max_steps": 2})
    assert Registry(tmp_path / "registry").list() == []
