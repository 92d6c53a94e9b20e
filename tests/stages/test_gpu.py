"""GPU-only paths, skipped on machines without CUDA (CI has none): QLoRA (4-bit base via bitsandbytes) for the
SFT, reward and DPO stages, bf16 chosen automatically, and an SFT adapter parent merged in full precision
before a 4-bit DPO stage loads it (never merged into 4-bit weights)."""

from __future__ import annotations

import pytest
import torch

from align.models.loading import four_bit_problem
from align.pipeline.run import run_recipe
from align.config.loading import validate_recipe
from align.registry.store import Registry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or four_bit_problem() is not None,
                                reason="needs a CUDA GPU with bitsandbytes")

QLORA = {"method": "qlora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def test_qlora_dpo_learns_in_bf16(tmp_path, tiny_base):
    from test_dpo import _train

    _, _, entry = _train(tmp_path, tiny_base, {**QLORA, "max_steps": 24})
    manifest = entry.manifest
    assert manifest["adapter"]["method"] == "qlora" and manifest["adapter"]["quant"]["quant_type"] == "nf4"
    assert manifest["timings"]["mixed_precision"] == "bf16"
    assert manifest["metrics"]["preference_accuracy"] >= 0.75


def test_qlora_reward_learns(tmp_path, tiny_base):
    from test_reward import _train

    run = _train(tmp_path, tiny_base, {**QLORA})
    assert run.entry.manifest["adapter"]["method"] == "qlora"
    assert run.entry.manifest["metrics"]["pairwise_accuracy"] >= 0.8


def test_qlora_sft_then_dpo_merges_in_full_precision(tmp_path, tiny_base, tiny_raw_recipe):
    """SFT (QLoRA) -> DPO (QLoRA): the DPO stage loads the SFT adapter merged into full-precision weights
    (a cached fp32 folder), then quantizes that, so no adapter is merged into 4-bit weights."""
    from test_dpo import preference_rows

    from tests.conftest import write_jsonl

    raw = tiny_raw_recipe(tmp_path, {**QLORA, "max_steps": 10})
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows())
    raw["stages"]["dpo"] = {"from": "sft", "data": str(prefs), **QLORA, "max_steps": 16, "batch_size": 8,
                            "lr": 5e-3, "beta": 0.5, "eval_split": 0.25, "scheduler": "constant"}
    recipe = validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))
    registry = Registry(tmp_path / "registry")
    produced = run_recipe(recipe, registry, runs_root=tmp_path / "runs")
    dpo = registry.resolve("tiny/dpo").manifest
    assert dpo["parent"]["ref"] == produced["sft"].ref
    assert dpo["metrics"]["preference_accuracy"] >= 0.75
    from align.models.packaged import cache_dir

    merged = cache_dir() / "merged" / produced["sft"].ref.replace("/", "--")
    assert (merged / "config.json").is_file()
    assert "quantization_config" not in (merged / "config.json").read_text()
