"""A tiny SFT stage and a tiny PPO stage on it print no deprecation warning for a name align passes:
TrainingArguments' `gradient_checkpointing[_kwargs]` (now `activation_checkpointing[_kwargs]`) and the
forward passes' `past_key_values` (now `cache`, in the RL sampler and the shared-prompt pass). The
`is_gradient_checkpointing` warning that is left is PEFT's: PEFT reads that property when it wraps a model,
and align never does (the CLI's `quiet_libraries` hides it)."""

from __future__ import annotations

import sys
import warnings

from align.config.loading import validate_recipe
from align.pipeline.run import run_recipe
from align.registry.store import Registry
from tests.conftest import write_jsonl

RENAMED_BY_ALIGN = ("`gradient_checkpointing` is deprecated", "`gradient_checkpointing_kwargs` is deprecated",
                    "`past_key_values` is deprecated")
PPO = {"from": "sft", "rewards": [{"checker": "regex", "args": {"pattern": "[0-9]"}}], "estimator": "grpo",
       "samples_per_prompt": 2, "rollout_batch": 4, "minibatch": 4, "batch_size": 4, "ppo_epochs": 1,
       "max_steps": 1, "generation": {"max_new_tokens": 4, "temperature": 1.0},
       "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "eval_split": 0.0}


def _readers_of_is_gradient_checkpointing(monkeypatch) -> list[str]:
    """The modules that read `PreTrainedModel.is_gradient_checkpointing`, in order (the property still runs)."""
    from transformers import PreTrainedModel

    readers: list[str] = []
    deprecated = PreTrainedModel.is_gradient_checkpointing

    def recorded(model):
        readers.append(sys._getframe(1).f_globals.get("__name__", "?"))
        return deprecated.fget(model)

    monkeypatch.setattr(PreTrainedModel, "is_gradient_checkpointing", property(recorded))
    return readers


def test_sft_then_ppo_warn_about_no_name_align_passes(tmp_path, tiny_raw_recipe, monkeypatch):
    raw = tiny_raw_recipe(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {a} + 1?"} for a in range(6)])
    raw["stages"]["ppo"] = {"prompts": str(prompts), **PPO}
    recipe = validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))
    readers = _readers_of_is_gradient_checkpointing(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        produced = run_recipe(recipe, Registry(tmp_path / "registry"), runs_root=tmp_path / "runs")
    assert sorted(produced) == ["ppo", "sft"]
    messages = [str(w.message) for w in caught]
    assert [m for m in messages if m.startswith(RENAMED_BY_ALIGN)] == []
    assert [name for name in readers if name.split(".")[0] == "align"] == []  # PEFT's reads only
