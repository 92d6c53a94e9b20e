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
from align.fingerprint import hash_file, hash_json, tokenizer_facts
from align.models import ModelSource, load_causal_lm, load_tokenizer
from align.pipeline import run_recipe
from align.recipe import validate_recipe
from align.registry import Registry
from align.stages.base import check_finite, latest_checkpoint, prepare_run_dir


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
    from tiny_entries import register_adapter, unmerged

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
    from align.tiny import TEMPLATES

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
