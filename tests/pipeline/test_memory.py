"""The peak-memory estimate (`align.pipeline.memory`): its arithmetic against real models and peft on a tiny shape, and
its total against the peak RSS of a short real SFT run of the default model (within 30%)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from align.pipeline.memory import MB, Shape, activation_bytes_per_token, estimate, estimate_stage, lora_params
from align.config.loading import validate_recipe
from tests.conftest import REPO_ROOT

TINY = {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


def test_shape_counts_the_parameters_of_the_model_it_describes(chatml_tokenizer):
    from align.models.tiny import make_model

    model = make_model(chatml_tokenizer, hidden=32, layers=2, heads=4, kv_heads=2)
    shape = Shape.from_config(model.config.to_dict())
    assert shape.params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_parameters_match_peft(chatml_tokenizer, targets):
    from peft import LoraConfig, get_peft_model

    from align.models.tiny import make_model

    model = make_model(chatml_tokenizer, hidden=32, layers=2, heads=4, kv_heads=2)
    shape = Shape.from_config(model.config.to_dict())
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(shape, 4, targets, shape.layers) == trainable


def test_activation_bytes_by_hand():
    shape = Shape.from_config(TINY)  # h 32, i 64, q 32, kv 16
    # fp32, no LoRA: two norms (2 x 8h) + SDPA q,k,v,out (4 x (2*32 + 2*16)) + MLP (3 x 4i); linears share inputs
    assert activation_bytes_per_token(shape, act_bytes=4, casts=False, adapted=(), dropout=False) == \
        2 * 8 * 32 + 4 * (64 + 32) + 3 * 4 * 64
    # bf16 autocast adds the bf16 casts of the five linears fed by a norm (2 bytes x h each) and halves the rest
    assert activation_bytes_per_token(shape, act_bytes=2, casts=True, adapted=(), dropout=False) == \
        2 * 8 * 32 + 2 * (64 + 32) + 3 * 2 * 64 + 5 * 2 * 32
    # LoRA with dropout on q only: its mask (1 byte) and the dropped-out input (4 bytes) per input feature
    assert activation_bytes_per_token(shape, act_bytes=4, casts=False, adapted=("q_proj",), dropout=True) == \
        2 * 8 * 32 + 4 * (64 + 32) + 3 * 4 * 64 + 5 * 32


def test_estimate_parts_follow_the_settings():
    shape = Shape.from_config(TINY)
    base = estimate(shape, batch=4, seq_len=64, lora_r=4)
    assert base.parts["weights"] == pytest.approx(shape.params() * 4 / MB)
    assert base.parts["trainable"] == pytest.approx(lora_params(shape, 4, "all-linear", 2) * 16 / MB)
    assert base.parts["logits"] == pytest.approx(4 * 64 * 16 * 400 / MB)
    assert base.total_mb == pytest.approx(sum(base.parts.values()))
    double = estimate(shape, batch=8, seq_len=64, lora_r=4)
    for part in ("activations", "logits"):
        assert double.parts[part] == pytest.approx(2 * base.parts[part])
    assert double.parts["weights"] == base.parts["weights"]
    assert estimate(shape, batch=4, seq_len=64, lora_r=8).parts["trainable"] == pytest.approx(
        2 * base.parts["trainable"])
    assert estimate(shape, method="qlora", batch=4, seq_len=64).parts["weights"] < base.parts["weights"] / 2
    assert estimate(shape, method="full", batch=4, seq_len=64).parts["trainable"] == pytest.approx(
        shape.params() * 16 / MB - shape.hidden * 16 / MB)
    frozen = estimate(shape, batch=4, seq_len=64, lora_r=4, freeze_layers=1)
    assert frozen.parts["activations"] == pytest.approx(base.parts["activations"] / 2)
    pairs = estimate(shape, rows_per_example=2, lm_head=False, batch=4, seq_len=64, lora_r=4)
    assert pairs.tokens == 2 * base.tokens and "logits" not in pairs.parts
    assert estimate(shape, rows_per_example=2, batch=4, seq_len=64, reference_copy=True).parts["reference"] == \
        base.parts["weights"]
    eager = estimate(shape, batch=4, seq_len=64, lora_r=4, eager_attention=True)
    assert "attention_weights" not in base.parts
    assert eager.parts["attention_weights"] == pytest.approx(2 * 4 * shape.heads * 64 * 64 * 8 / MB)
    assert estimate(shape, batch=4, seq_len=128, lora_r=4, eager_attention=True).parts["attention_weights"] == \
        pytest.approx(4 * eager.parts["attention_weights"])  # grows with the square of the length


def test_estimate_stage_reads_the_stage_config():
    raw = {"name": "m", "base": "b", "stages": {"sft": {"data": "x.jsonl", "batch_size": 4, "max_length": 128,
                                                        "lora": {"r": 4}, "method": "lora"}}}
    cfg = validate_recipe(raw, []).stages["sft"]
    shape = Shape.from_config(TINY)
    bound = estimate_stage(shape, cfg)
    assert bound.seq_len == 128 and bound.seq_is_bound and bound.tokens == 4 * 128
    measured = estimate_stage(shape, cfg, seq_len=50)
    assert measured.seq_len == 50 and not measured.seq_is_bound
    assert estimate_stage(shape, cfg, seq_len=1000).seq_len == 128
    assert "peak memory ~" in bound.describe() and "<= 128 tokens" in bound.describe()


def test_plan_prints_an_estimate_per_stage(tiny_raw_recipe, tmp_path):
    from align.pipeline.plan import make_plan
    from align.registry.store import Registry

    raw = tiny_raw_recipe(tmp_path)
    plan = make_plan(validate_recipe(raw, [], source=str(tmp_path / "r.yaml")), Registry(tmp_path / "registry"))
    notes = [n for n in plan.stages[0].notes if n.startswith("memory:")]
    assert len(notes) == 1 and "peak memory ~" in notes[0]
    assert "tokens each" in notes[0] and "<=" not in notes[0]  # the data's longest row, not max_length


# ------------------------------------------------------------------------------------------ the real model


@pytest.mark.real_model
def test_estimate_is_within_30_percent_of_a_measured_sft_peak(default_model_registry, tmp_path):
    """One step of the quickstart's SFT stage (LoRA r16, batch 8, max_length 256, bf16 autocast where the CPU
    has it) in a fresh process; its peak RSS (recorded in the manifest) against the plan's estimate."""
    from align.pipeline.plan import make_plan
    from align.pipeline.plan_data import longest_demonstration
    from align.pipeline.plan_models import local_folder, tokenizer_in_folder
    from align.registry.store import Registry

    quickstart = yaml.safe_load((REPO_ROOT / "recipes" / "smollm2" / "quickstart.yaml").read_text())
    sft = {**quickstart["stages"]["sft"], "data": str(REPO_ROOT / "data" / "quickstart" / "sft.jsonl"),
           "max_steps": 1, "eval_split": 0.0, "save_steps": 100, "logging_steps": 1}
    raw = {"name": "memcheck", "base": quickstart["base"], "registry": str(default_model_registry),
           "defaults": quickstart["defaults"], "stages": {"sft": sft}, "eval": {"metrics": ["loss"]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    recipe = validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))
    registry = Registry(default_model_registry)
    plan = make_plan(recipe, registry)
    cfg = recipe.stages["sft"]
    config_dir, tokenizer_dir = local_folder(plan.base, registry)
    seq_len = longest_demonstration(recipe, cfg, tokenizer_in_folder(tokenizer_dir))
    assert seq_len is not None and seq_len < cfg.max_length
    found = estimate_stage(Shape.from_file(config_dir / "config.json"), cfg, seq_len=seq_len)
    assert f"memory: {found.describe()}" in plan.stages[0].notes  # what `align plan` prints
    estimated = found.total_mb

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-m", "align.cli.main", "run", "r.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads(next((default_model_registry / "memcheck" / "sft").glob("v*/manifest.json")).read_text())
    measured = manifest["timings"]["peak_rss_mb"]
    print(f"SFT peak: estimated {estimated:.0f} MB, measured {measured:.0f} MB")  # shown with pytest -s
    assert abs(estimated - measured) <= 0.3 * measured, f"estimated {estimated:.0f} MB, measured {measured:.0f} MB"


def _recorded_sft_runs():
    """Quickstart SFT entries of this checkout's registry with a recorded peak (none in a fresh clone)."""
    found = []
    for path in sorted((REPO_ROOT / "registry" / "quickstart" / "sft").glob("v*/manifest.json")):
        manifest = json.loads(path.read_text())
        if (manifest.get("timings") or {}).get("peak_rss_mb") and manifest.get("config"):
            found.append(path)
    return found


@pytest.mark.real_model
@pytest.mark.parametrize("manifest_path", _recorded_sft_runs() or [None],
                         ids=lambda p: str(p.parent.name) if p else "none")
def test_estimate_is_within_30_percent_of_recorded_quickstart_peaks(manifest_path):
    """The peaks whole quickstart SFT runs recorded in their manifests (training plus the hook's evaluation),
    against the estimate from the configuration each manifest holds."""
    from align.pipeline.plan_data import longest_demonstration
    from align.pipeline.plan_models import tokenizer_in_folder
    from align.config.stages import SFTStage

    if manifest_path is None:
        pytest.skip("no quickstart SFT entry with a recorded peak in this checkout's registry")
    manifest = json.loads(manifest_path.read_text())
    base = REPO_ROOT / "registry" / "smollm2-135m-instruct"
    entries = sorted(base.glob("v*/manifest.json"))
    if not entries:
        pytest.skip("the default model is not in this checkout's registry")
    cfg = SFTStage.model_validate(manifest["config"])
    raw = {"name": "q", "base": "b", "stages": {"sft": manifest["config"]}}
    recipe = validate_recipe(raw, [], source=str(REPO_ROOT / "recipe.yaml"))  # data paths from the repo root
    model_dir = entries[-1].parent
    seq_len = longest_demonstration(recipe, cfg, tokenizer_in_folder(model_dir / "tokenizer"))
    assert seq_len is not None
    found = estimate_stage(Shape.from_file(model_dir / "model" / "config.json"), cfg, seq_len=seq_len)
    measured = manifest["timings"]["peak_rss_mb"]
    assert abs(found.total_mb - measured) <= 0.3 * measured, f"estimated {found.total_mb:.0f}, measured {measured}"


def test_a_pair_batch_split_into_passes_is_estimated_by_its_biggest_pass():
    raw = {"name": "m", "base": "b", "stages": {"rm": {"kind": "reward", "data": "x.jsonl", "batch_size": 8,
                                                       "max_length": 384}}}
    shape = Shape.from_config(TINY)
    default = estimate_stage(shape, validate_recipe(raw, []).stages["rm"])  # 16 x 384 over 1024: 6 passes
    raw["stages"]["rm"]["max_pass_tokens"] = 4096
    split = estimate_stage(shape, validate_recipe(raw, []).stages["rm"])  # over 4096: two passes of 4 pairs
    raw["stages"]["rm"]["max_pass_tokens"] = None
    whole = estimate_stage(shape, validate_recipe(raw, []).stages["rm"])
    assert whole.tokens == 16 * 384 and split.tokens == 8 * 384 and default.tokens == 4 * 384  # 2 of 8 pairs
    assert split.parts["activations"] == pytest.approx(whole.parts["activations"] / 2)


def test_an_sft_batch_split_into_passes_is_estimated_by_its_biggest_pass():
    raw = {"name": "m", "base": "b", "stages": {"sft": {"kind": "sft", "data": "x.jsonl", "batch_size": 4,
                                                        "max_length": 512}}}
    shape = Shape.from_config(TINY)
    split = estimate_stage(shape, validate_recipe(raw, []).stages["sft"])  # 4 x 512 over 1024: two passes
    raw["stages"]["sft"]["max_pass_tokens"] = None
    whole = estimate_stage(shape, validate_recipe(raw, []).stages["sft"])
    assert whole.tokens == 4 * 512 and split.tokens == 2 * 512
