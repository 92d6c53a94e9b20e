"""The KTO stage end to end on a tiny random Llama: from preference pairs split into desirable and undesirable
rows it learns a separable preference (held-out label and pairwise accuracy rise from the parent's 0.5), the
figures it records are what the saved entry gives, a batch split into passes trains as one pass (z0 is the
whole batch's), unpaired rows train with the per-step reference and no KL estimate, an interrupted run
resumes to the same result, and bad settings are named with their YAML path."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from align.config.loading import validate_recipe
from align.data.prepare_unpaired import prepare_feedback
from align.errors import ConfigError
from align.models.loading import ModelSource, load_causal_lm, load_tokenizer
from align.pipeline.run import run_recipe
from align.registry.store import Registry
from align.stages.kto import feedback_metrics
from tests.conftest import write_jsonl
from tests.stages.test_dpo import KIND, RUDE, preference_rows

FAST_KTO = {"max_steps": 24, "batch_size": 8, "lr": 5e-3, "logging_steps": 4, "save_steps": 12,
            "eval_split": 0.25, "scheduler": "constant", "beta": 0.5, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def unpaired_rows(count: int = 48) -> list[dict]:
    rng = random.Random(2)
    return [{"prompt": f"Request {i}: please help with job {rng.randint(0, 99)}.",
             "completion": rng.choice(KIND if i % 2 else RUDE), "label": bool(i % 2)} for i in range(count)]


def _recipe(folder: Path, base, stage: dict | None = None, rows: list[dict] | None = None):
    data = write_jsonl(folder / "feedback.jsonl", rows or preference_rows())
    raw = {"name": "tiny", "base": str(base), "eval": {"metrics": ["loss"]},
           "stages": {"kto": {"data": str(data), **FAST_KTO, **(stage or {})}}}
    return validate_recipe(raw, [], source=str(folder / "r.yaml"))


def _train(folder: Path, base, stage: dict | None = None, rows: list[dict] | None = None):
    recipe = _recipe(folder, base, stage, rows)
    registry = Registry(folder / "registry")
    run_recipe(recipe, registry, runs_root=folder / "runs")
    return recipe, registry, registry.resolve("tiny/kto")


def _losses(entry_or_manifest) -> list[float]:
    manifest = getattr(entry_or_manifest, "manifest", entry_or_manifest)
    return [h["loss"] for h in manifest["history"] if "loss" in h]


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory, tiny_base):
    return _train(tmp_path_factory.mktemp("kto-pairs"), tiny_base)


def test_learns_a_separable_preference_from_pairs_split_into_rows(pairs_run, tiny_base):
    recipe, registry, entry = pairs_run
    metrics = entry.manifest["metrics"]
    # The parent (policy = reference): every implicit reward 0, on z0: label and pairwise accuracy 0.5.
    parent = ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base))
    tokenizer = load_tokenizer(parent, registry)
    _, heldout, _ = prepare_feedback(recipe, recipe.stages["kto"], tokenizer)
    saved = torch.load(Path(recipe.source).parent / "runs" / "tiny" / "kto" / "reference_logps.pt")
    before, _ = feedback_metrics(recipe.stages["kto"], load_causal_lm(parent, registry, dtype="fp32"), heldout,
                                 saved["heldout"], tokenizer.pad_token_id, 16)
    assert before["label_accuracy"] == pytest.approx(0.5, abs=0.1)
    assert metrics["label_accuracy"] >= 0.85 > before["label_accuracy"]
    assert metrics["preference_accuracy"] >= 0.9 and metrics["pairs"] == 16 and metrics["rows"] == 32
    assert metrics["reward_gap"] > 1.0 and metrics["rewards_desirable"] > metrics["rewards_undesirable"]
    losses = _losses(entry)
    assert losses[-1] < 0.8 * losses[0]
    logged = next(h for h in entry.manifest["history"] if "rewards_gap" in h)
    assert {"kl", "train_label_accuracy", "rewards_desirable", "rewards_undesirable"} <= set(logged)
    assert entry.manifest["preference"] == {"loss": "kto", "beta": 0.5, "weights": {"desirable": 1.0,
                                            "undesirable": 1.0}, "reference": "precomputed",
                                            "kl_estimate": "mismatched"}
    assert entry.file("reward_histogram.png").stat().st_size > 0
    assert entry.manifest["baseline"]["metrics"]["eval_fingerprint"] == metrics["eval_fingerprint"]


def test_the_recorded_figures_are_what_the_saved_entry_gives(pairs_run, tiny_base):
    recipe, registry, entry = pairs_run
    source = ModelSource(ref=entry.ref, kind="registry", entry=entry)
    tokenizer = load_tokenizer(source, registry)
    _, heldout, _ = prepare_feedback(recipe, recipe.stages["kto"], tokenizer)
    saved = torch.load(Path(recipe.source).parent / "runs" / "tiny" / "kto" / "reference_logps.pt")
    again, _ = feedback_metrics(recipe.stages["kto"], load_causal_lm(source, registry, dtype="fp32"), heldout,
                                saved["heldout"], tokenizer.pad_token_id, 16)
    recorded = entry.manifest["metrics"]
    for key in ("reward_gap", "rewards_desirable", "kl_estimate"):
        assert again[key] == pytest.approx(recorded[key], rel=2e-2, abs=2e-2), key
    assert again["label_accuracy"] == recorded["label_accuracy"]


def test_interrupted_run_resumes_to_the_same_result(pairs_run, tmp_path):
    """Stopped after the checkpoint at step 12, the run resumes from it, reuses the saved reference log-probs
    and ends where the uninterrupted run ended."""
    recipe, _, original = pairs_run
    runs_root = tmp_path / "runs"
    shutil.copytree(Path(recipe.source).parent / "runs", runs_root)
    run_dir = runs_root / "tiny" / "kto"
    shutil.rmtree(run_dir / "checkpoint-24")
    (run_dir / "registered.json").unlink()
    saved = (run_dir / "reference_logps.pt").stat().st_mtime_ns
    registry = Registry(tmp_path / "registry")
    run_recipe(recipe, registry, runs_root=runs_root)
    resumed = registry.resolve("tiny/kto").manifest
    assert resumed["timings"]["resumed_from"] == str(run_dir / "checkpoint-12") and resumed["timings"]["steps"] == 24
    assert (run_dir / "reference_logps.pt").stat().st_mtime_ns == saved
    assert _losses(resumed) == pytest.approx(_losses(original), abs=1e-4)
    assert resumed["metrics"]["reward_gap"] == pytest.approx(original.manifest["metrics"]["reward_gap"], abs=1e-3)


def test_a_batch_split_into_passes_trains_as_one_pass(tmp_path, tiny_base, monkeypatch):
    """`max_pass_tokens` below the batch's size: several passes a step, each with the whole batch's z0, so the
    losses are the one-pass ones (fp32)."""
    from align.data import passes

    split, counts = passes.split_row_batch, []
    monkeypatch.setattr(passes, "split_row_batch", lambda inputs, budget: counts.append(len(split(inputs, budget)))
                        or split(inputs, budget))
    stage = {"max_steps": 4, "logging_steps": 1, "mixed_precision": "no", "lr": 1e-2}
    runs = {budget: _train(tmp_path / str(budget), tiny_base, {**stage, "max_pass_tokens": budget})[2]
            for budget in (None, 100)}
    assert max(counts) >= 3  # the small budget really split the batches
    assert _losses(runs[100]) == pytest.approx(_losses(runs[None]), abs=1e-5)
    kl = {b: [h["kl"] for h in e.manifest["history"] if "kl" in h] for b, e in runs.items()}
    assert kl[100] == pytest.approx(kl[None], abs=1e-4) and max(kl[None]) > 0


def test_unpaired_rows_train_with_the_per_step_reference_and_no_kl_estimate(tmp_path, tiny_base):
    _, _, entry = _train(tmp_path, tiny_base, {"reference": "adapter_disabled", "kl_estimate": "none",
                                               "max_steps": 8}, rows=unpaired_rows())
    metrics = entry.manifest["metrics"]
    assert metrics["label_accuracy"] >= 0.75 and metrics["reward_gap"] > 0
    assert metrics["kl_estimate"] == 0.0 and "preference_accuracy" not in metrics  # no pairs held out
    assert entry.manifest["preference"]["reference"] == "adapter_disabled"
    assert {h["kl"] for h in entry.manifest["history"] if "kl" in h} == {0.0}
    assert _losses(entry)[-1] < _losses(entry)[0]


def test_the_reference_from_the_frozen_prefix_trains_as_the_adapter_disabled_one(tmp_path, tiny_base):
    """`frozen_prefix` (the frozen bottom block run once for policy and reference, rows and mismatched
    combinations alike): the losses, z0 and held-out figures of the full adapter-disabled passes (fp32)."""
    stage = {"freeze_layers": 1, "mixed_precision": "no", "max_steps": 6}
    entries = {mode: _train(tmp_path / mode, tiny_base, {**stage, "reference": mode})[2]
               for mode in ("adapter_disabled", "frozen_prefix")}
    assert _losses(entries["frozen_prefix"]) == pytest.approx(_losses(entries["adapter_disabled"]), abs=1e-5)
    kl = {m: [h["kl"] for h in e.manifest["history"] if "kl" in h] for m, e in entries.items()}
    assert kl["frozen_prefix"] == pytest.approx(kl["adapter_disabled"], abs=1e-4)
    for mode, entry in entries.items():
        assert entry.manifest["preference"]["reference"] == mode
    assert entries["frozen_prefix"].manifest["metrics"]["label_accuracy"] == \
        entries["adapter_disabled"].manifest["metrics"]["label_accuracy"]
    assert not (tmp_path / "frozen_prefix" / "runs" / "tiny" / "kto" / "reference_logps.pt").exists()


@pytest.mark.parametrize("stage, where, says", [
    ({"method": "full", "reference": "adapter_disabled"}, "stages.kto", "adapter_disabled needs method lora"),
    ({"margin_field": "m"}, "stages.kto", "KTO's rows carry no margin"),
    ({"reference": "frozen_prefix"}, "stages.kto", "frozen_prefix needs freeze_layers > 0"),
    ({"loss": "dpo"}, "stages.kto.loss", "'kto'"),
    ({"kl_estimate": "batch"}, "stages.kto.kl_estimate", "'mismatched' or 'none'"),
    ({"desirable_weight": 0}, "stages.kto.desirable_weight", "greater than 0"),
])
def test_bad_settings_are_named_with_their_path(tmp_path, tiny_base, stage, where, says):
    with pytest.raises(ConfigError) as info:
        _recipe(tmp_path, tiny_base, stage)
    found = {p.where: p.message for p in info.value.problems}
    assert where in found and says in found[where], found
