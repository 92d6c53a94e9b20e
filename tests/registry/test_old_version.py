"""A registry and run folders written by the previous version of align (`tests/fixtures/registry_v0/`, made
by `tests/fixtures/make_registry_v0.py` at commit 6568d2a, before the Stage redesign) still work: every
entry loads and verifies, finished stages are recognised as finished, interrupted SFT and PPO runs resume
from their checkpoints to the end, and an old entry is a parent for new training and a merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from align.registry.integrity import source_problems
from align.export.merge import merge
from align.models.loading import ModelSource, load_causal_lm
from align.pipeline.run import run_recipe
from align.config.loading import load_recipe
from align.registry.store import Registry

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "registry_v0"
OLD_ENTRIES = ["chain/dpo@1", "chain/ppo@1", "chain/reward@1", "chain/sft@1", "tiny/base@1"]


@pytest.fixture
def old(tmp_path, monkeypatch):
    """A copy of the old version's folder, as the working directory (its recipes name data relatively)."""
    folder = tmp_path / "old"
    shutil.copytree(FIXTURE, folder)
    monkeypatch.chdir(folder)
    return folder


def test_every_old_entry_loads_and_verifies(old):
    registry = Registry(old / "registry")
    assert sorted(e.ref for e in registry.list()) == OLD_ENTRIES
    for ref in OLD_ENTRIES:
        entry = registry.resolve(ref)
        assert source_problems(ModelSource(ref=ref, kind="registry", entry=entry), registry, full=True) == []
    model = load_causal_lm(ModelSource(ref="chain/ppo@1", kind="registry", entry=registry.resolve("chain/ppo@1")),
                           registry, dtype="fp32")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_finished_old_stages_are_not_trained_again(old):
    registry = Registry(old / "registry")
    produced = run_recipe(load_recipe(old / "chain.yaml"), registry, runs_root=Path("runs"))
    assert {name: e.ref for name, e in produced.items()} == {
        "sft": "chain/sft@1", "reward": "chain/reward@1", "dpo": "chain/dpo@1", "ppo": "chain/ppo@1"}
    assert sorted(e.ref for e in registry.list()) == OLD_ENTRIES


@pytest.mark.parametrize("stage, steps", [("sft", 6), ("ppo", 4)])
def test_an_interrupted_old_run_resumes_from_its_checkpoint(old, stage, steps):
    registry = Registry(old / "registry")
    entry = run_recipe(load_recipe(old / "halfway.yaml"), registry, only=[stage], runs_root=Path("runs"))[stage]
    assert entry.ref == f"halfway/{stage}@1"
    timings = entry.manifest["timings"]
    assert timings["resumed_from"] is not None and timings["resumed_from"].endswith("checkpoint-2")
    if stage == "ppo":
        assert timings["steps"] == steps and timings["steps_this_run"] == steps - 2
    else:
        assert max(h.get("step", 0) for h in entry.manifest["history"]) == steps


def test_an_old_entry_is_a_parent_for_new_training_and_merges(old):
    registry = Registry(old / "registry")
    raw = json.loads(json.dumps({"name": "newer", "base": "tiny/base",
                                 "stages": {"dpo": {"from": "chain/sft@1", "data": "data/pairs.jsonl",
                                                    "max_steps": 2, "batch_size": 4, "eval_split": 0.2,
                                                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}}}))
    (old / "newer.yaml").write_text(json.dumps(raw))
    entry = run_recipe(load_recipe(old / "newer.yaml"), registry, runs_root=Path("runs"))["dpo"]
    assert entry.manifest["parent"]["ref"] == "chain/sft@1"
    merged = merge("chain/dpo@1", registry)
    assert merged.artifact["type"] == "full" and merged.manifest["parent"]["ref"] == "chain/dpo@1"
