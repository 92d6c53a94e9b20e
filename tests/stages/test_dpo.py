"""The DPO stage end to end on a tiny random Llama: it learns a separable preference (held-out implicit-
reward accuracy rises), the reference stays frozen, every loss variant and reference mode trains, a
tokenizer or chat-template mismatch with the parent is refused, and an interrupted run resumes."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from align.data.prepare import prepare_pairs
from align.errors import ConfigError, TrainingError
from align.models.loading import ModelSource, load_causal_lm, load_tokenizer
from align.pipeline.run import run_recipe
from align.config.loading import validate_recipe
from align.registry.store import Registry
from align.stages.dpo_reference import pair_logps
from safetensors.torch import load_file
from tests.conftest import write_jsonl

KIND = ["Sure, here is some help.", "Happy to help you with that.", "Of course, glad to help."]
RUDE = ["No. Go away.", "I refuse, stop asking me.", "Leave me alone now."]
FAST_DPO = {"max_steps": 24, "batch_size": 8, "lr": 5e-3, "logging_steps": 4, "save_steps": 12,
            "eval_split": 0.25, "scheduler": "constant", "beta": 0.5,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def preference_rows(count: int = 64) -> list[dict]:
    rng = random.Random(1)
    return [{"prompt": f"Question {i}: can you help with task {rng.randint(0, 99)}?",
             "chosen": rng.choice(KIND), "rejected": rng.choice(RUDE)} for i in range(count)]


def _recipe(folder: Path, base, stage: dict | None = None):
    data = write_jsonl(folder / "prefs.jsonl", preference_rows())
    raw = {"name": "tiny", "base": str(base), "stages": {"dpo": {"data": str(data), **FAST_DPO, **(stage or {})}}}
    return validate_recipe(raw, [], source=str(folder / "r.yaml"))


def _train(folder: Path, base, stage: dict | None = None):
    recipe = _recipe(folder, base, stage)
    registry = Registry(folder / "registry")
    run_recipe(recipe, registry, runs_root=folder / "runs")
    return recipe, registry, registry.resolve("tiny/dpo")


def _heldout_logps(recipe, registry, source: ModelSource):
    tokenizer = load_tokenizer(source, registry)
    _, heldout, _ = prepare_pairs(recipe, recipe.stages["dpo"], tokenizer)
    model = load_causal_lm(source, registry, dtype="fp32")
    return pair_logps(model, heldout, tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_base):
    return _train(tmp_path_factory.mktemp("dpo-lora"), tiny_base)


def test_learns_a_separable_preference(lora_run, tiny_base):
    recipe, registry, entry = lora_run
    metrics = entry.manifest["metrics"]
    assert metrics["preference_accuracy"] >= 0.9
    assert metrics["reward_margin"] > 0.5
    assert metrics["rewards_chosen"] > metrics["rewards_rejected"]
    losses = [h["loss"] for h in entry.manifest["history"] if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    assert {"train_accuracy", "rewards_chosen", "rewards_rejected", "rewards_margin"} <= set(
        next(h for h in entry.manifest["history"] if "rewards_margin" in h))
    assert entry.manifest["preference"] == {"loss": "sigmoid", "beta": 0.5, "reference": "precomputed"}
    assert entry.file("margin_histogram.png").stat().st_size > 0
    # The held-out margin recorded is what the saved entry gives against its parent.
    parent = ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base))
    policy = _heldout_logps(recipe, registry, ModelSource(ref=entry.ref, kind="registry", entry=entry))
    reference = _heldout_logps(recipe, registry, parent)
    rewards = 0.5 * (policy - reference)
    assert float((rewards[:, 0] - rewards[:, 1]).mean()) == pytest.approx(metrics["reward_margin"], rel=1e-2)


def test_reference_stays_frozen(lora_run, tiny_base):
    """The precomputed reference log-probs are the parent's, and the parent's weights are untouched."""
    recipe, registry, entry = lora_run
    parent = ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base))
    saved = torch.load(Path(recipe.source).parent / "runs" / "tiny" / "dpo" / "reference_logps.pt")
    now = _heldout_logps(recipe, registry, parent)
    assert torch.allclose(saved["heldout"].float(), now.float(), atol=2e-3)


@pytest.mark.parametrize("stage", [
    {"reference": "adapter_disabled"},
    {"loss": "ipo", "beta": 0.1},
    {"loss": "hinge"},
    {"loss": "cdpo", "label_smoothing": 0.1},
    {"loss": "simpo", "beta": 2.0},
    {"loss": "orpo", "lr": 1e-2},
    {"method": "full", "reference": "copy", "lr": 1e-3},
])
def test_variants_learn(tmp_path, tiny_base, stage):
    _, _, entry = _train(tmp_path, tiny_base, {"max_steps": 16, **stage})
    metrics = entry.manifest["metrics"]
    assert metrics["preference_accuracy"] >= 0.75, metrics
    assert metrics["reward_margin"] > 0


def test_full_fine_tuning_from_a_lora_entry_trains_the_merged_weights(tmp_path, tiny_base):
    """`method: full` (with a frozen `reference: copy`) from a LoRA entry trains every merged weight; it used to
    fail at step 1 on 0 trainable parameters, PEFT having loaded the adapter frozen."""
    from tests.tiny_entries import register_adapter, unmerged

    parent = register_adapter(Registry(tmp_path / "registry"), tiny_base, name="tiny/lora")
    _, _, entry = _train(tmp_path, tiny_base, {"from": parent.ref, "method": "full", "reference": "copy",
                                               "max_steps": 4, "lr": 1e-3})
    assert entry.artifact["type"] == "full" and entry.manifest["parent"] == {"source": "registry", "ref": parent.ref}
    merged = unmerged(parent).merge_and_unload().state_dict()
    trained = load_file(str(entry.file("model", "model.safetensors")))
    unchanged = [k for k in trained if torch.equal(trained[k], merged[k])]
    assert not unchanged, f"not trained: {unchanged}"


def test_the_manifest_holds_the_parents_baseline_measured_by_the_same_hook(lora_run, tiny_base):
    """As SFT and PPO entries do: the parent through the same evaluation hook as the entry (held-out chosen
    responses), so the manifest, and `align run`'s summary, show what the stage changed."""
    from align.eval.hook import evaluate_model

    recipe, registry, entry = lora_run
    baseline, metrics = entry.manifest["baseline"], entry.manifest["metrics"]
    parent = ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base))
    assert baseline["of"] == parent.lineage()
    assert baseline["metrics"]["eval_fingerprint"] == metrics["eval_fingerprint"]
    tokenizer = load_tokenizer(parent, registry)
    _, heldout, _ = prepare_pairs(recipe, recipe.stages["dpo"], tokenizer)
    measured = evaluate_model(recipe, load_causal_lm(parent, registry, dtype="fp32").eval(), tokenizer,
                              [p.chosen for p in heldout])
    assert baseline["metrics"]["eval_loss"] == pytest.approx(measured["eval_loss"], rel=1e-3)
    assert baseline["metrics"]["eval_loss"] != pytest.approx(metrics["eval_loss"], rel=1e-3)


def test_adapter_disabled_reference_is_the_parent(tmp_path, tiny_base):
    """With the adapter switched off the policy computes the parent's log-probs, before and after training."""
    recipe, registry, entry = _train(tmp_path, tiny_base, {"reference": "adapter_disabled", "max_steps": 8})
    from peft import PeftModel

    parent = ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base))
    tokenizer = load_tokenizer(parent, registry)
    _, heldout, _ = prepare_pairs(recipe, recipe.stages["dpo"], tokenizer)
    base = load_causal_lm(parent, registry, dtype="fp32")
    before = pair_logps(base, heldout, tokenizer.pad_token_id)
    policy = PeftModel.from_pretrained(base, str(entry.file("adapter")))
    with policy.disable_adapter():
        disabled = pair_logps(policy, heldout, tokenizer.pad_token_id)
    trained = pair_logps(policy, heldout, tokenizer.pad_token_id)
    assert torch.allclose(before, disabled, atol=1e-4)
    assert not torch.allclose(before, trained, atol=1e-2)


def test_template_mismatch_is_refused(tmp_path, tiny_base):
    """Refused by the plan that `align run` makes first (the stage's own check at run time is tested for
    every kind in tests/stages/test_base.py)."""
    other = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError) as err:
        _train(tmp_path, tiny_base, {"chat_template": other})
    message = str(err.value)
    assert "stages.dpo.chat_template" in message and "differs from its parent" in message
    assert "allow_template_mismatch" in message
    assert not (tmp_path / "registry" / "tiny").exists()  # refused before anything was trained or written


def test_template_mismatch_allowed_when_overridden(tmp_path, tiny_base):
    other = "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    _, _, entry = _train(tmp_path, tiny_base, {"chat_template": other, "allow_template_mismatch": True,
                                               "max_steps": 4})
    assert entry.manifest["tokenizer"]["chat_template_hash"] != ""


@pytest.mark.parametrize("stage, key", [
    ({"loss": "cdpo"}, "label_smoothing"),
    ({"loss": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
    ({"loss": "simpo", "reference": "copy"}, "reference-free"),
    ({"method": "full", "reference": "adapter_disabled"}, "adapter_disabled"),
    ({"reference": "frozen_prefix"}, "freeze_layers > 0"),
    ({"beta": 0}, "beta"),
])
def test_bad_settings_are_named(tmp_path, tiny_base, stage, key):
    with pytest.raises(ConfigError) as err:
        _recipe(tmp_path, tiny_base, stage)
    assert "stages.dpo" in str(err.value) and key in str(err.value)


def test_interrupted_run_resumes_to_the_same_result(lora_run, tmp_path):
    """Stopped after a checkpoint, the run resumes from it (reusing the saved reference log-probs, not
    recomputing them) and ends where the uninterrupted run ended."""
    recipe, _, original = lora_run
    runs_root = tmp_path / "runs"
    shutil.copytree(Path(recipe.source).parent / "runs", runs_root)
    run_dir = runs_root / "tiny" / "dpo"
    shutil.rmtree(run_dir / "checkpoint-24")  # as if stopped after the checkpoint at step 12
    (run_dir / "registered.json").unlink()  # and so never registered
    saved = (run_dir / "reference_logps.pt").stat().st_mtime_ns
    registry = Registry(tmp_path / "registry")
    run_recipe(recipe, registry, runs_root=runs_root)
    resumed = registry.resolve("tiny/dpo").manifest
    assert resumed["timings"]["resumed_from"] == str(run_dir / "checkpoint-12")
    assert resumed["timings"]["steps"] == 24
    assert (run_dir / "reference_logps.pt").stat().st_mtime_ns == saved
    losses = [[h["loss"] for h in m["history"] if "loss" in h] for m in (resumed, original.manifest)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert resumed["metrics"]["reward_margin"] == pytest.approx(original.manifest["metrics"]["reward_margin"],
                                                                abs=1e-3)
    assert resumed["baseline"] == original.manifest["baseline"]  # measured once, kept in the run folder


def test_exploding_loss_stops_and_registers_nothing(tmp_path, tiny_base):
    with pytest.raises(TrainingError, match=r"loss became (nan|inf|-inf) at step \d+"):
        _train(tmp_path, tiny_base, {"method": "full", "lr": 1e38})
    assert Registry(tmp_path / "registry").list() == []


def test_preference_loss_adds_the_rpo_term_by_hand():
    """rpo_alpha adds alpha * the chosen side's per-token NLL to the DPO loss; rewards are unchanged."""
    from types import SimpleNamespace

    from align.stages.dpo import preference_loss

    logp = torch.tensor([-4.0, -9.0, -6.0, -5.0])  # chosen 0, chosen 1, rejected 0, rejected 1 (sums)
    counts = torch.tensor([2, 3, 2, 5])
    reference = torch.tensor([-5.0, -9.0, -5.0, -6.0])
    plain = SimpleNamespace(loss="sigmoid", beta=0.5, label_smoothing=0.0, rpo_alpha=0.0)
    loss, chosen, rejected = preference_loss(plain, logp, counts, reference)
    h = torch.tensor([(-4 + 5) - (-6 + 5), (-9 + 9) - (-5 + 6)], dtype=torch.float32)
    assert float(loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(0.5 * h).mean()), abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 0.5])
    rpo = SimpleNamespace(**{**vars(plain), "rpo_alpha": 2.0})
    loss_rpo, chosen_rpo, _ = preference_loss(rpo, logp, counts, reference)
    nll = (4.0 / 2 + 9.0 / 3) / 2
    assert float(loss_rpo) == pytest.approx(float(loss) + 2.0 * nll, abs=1e-6)
    assert torch.equal(chosen_rpo, chosen)


def test_rpo_term_keeps_chosen_likelihood_up(tmp_path, tiny_base):
    """Plain DPO may lower the chosen responses' likelihood along with the rejected ones; with rpo_alpha the
    chosen log-probs end higher, at a comparable preference accuracy."""
    _, _, plain = _train(tmp_path / "plain", tiny_base, {"max_steps": 16})
    _, _, rpo = _train(tmp_path / "rpo", tiny_base, {"max_steps": 16, "rpo_alpha": 1.0})
    assert rpo.manifest["metrics"]["logps_chosen"] > plain.manifest["metrics"]["logps_chosen"]
    assert rpo.manifest["metrics"]["preference_accuracy"] >= 0.75


def test_a_batch_split_into_passes_trains_the_same(tmp_path, tiny_base, monkeypatch):
    """`max_pass_tokens` below the batch's size: several passes a step, the one-pass losses and weights (fp32)."""
    import align.data.passes as passes

    split = passes.split_pair_batch
    counts = []
    monkeypatch.setattr(passes, "split_pair_batch", lambda inputs, budget: counts.append(len(split(inputs, budget)))
                        or split(inputs, budget))
    runs = {budget: _train(tmp_path / str(budget), tiny_base, {"max_pass_tokens": budget, "mixed_precision": "no"})
            for budget in (None, 100)}
    assert max(counts) > 2  # the small budget really split the batches
    losses = {b: [h["loss"] for h in entry.manifest["history"] if "loss" in h] for b, (_, _, entry) in runs.items()}
    assert len(losses[None]) > 3 and losses[100] == pytest.approx(losses[None], abs=1e-5)
    assert losses[100][-1] < losses[100][0]
    weights = {b: load_file(str(entry.file("adapter/adapter_model.safetensors"))) for b, (_, _, entry) in runs.items()}
    for name, tensor in weights[None].items():
        assert torch.allclose(weights[100][name], tensor, atol=1e-3), name  # Adam, 24 steps at lr 5e-3: summation
        # order differences in small gradients move a weight by up to ~1e-4


def test_a_reference_pass_the_budget_cannot_hold_switches_to_the_per_step_reference(tmp_path, tiny_base,
                                                                                    monkeypatch):
    """`reference: auto` under `time_limit_minutes`: when the projected reference pass plus the training after
    it would not fit, the stage computes the reference per step instead, trains, registers, says so in the
    manifest, and learns the preference all the same."""
    import align.stages.dpo_reference as dpo

    monkeypatch.setattr(dpo, "TRAIN_PER_REFERENCE", 1e9)  # any budget is too short for the precomputed path
    recipe, registry, entry = _train(tmp_path, tiny_base, {"time_limit_minutes": 30, "batch_size": 4})
    assert entry.manifest["timings"]["reference"] == "adapter_disabled"
    assert (tmp_path / "runs" / "tiny" / "dpo" / dpo.SWITCHED_FILE).is_file()
    assert not (tmp_path / "runs" / "tiny" / "dpo" / "reference_logps.pt").exists()
    assert entry.manifest["metrics"]["preference_accuracy"] > 0.8


def test_a_budget_that_holds_the_reference_pass_keeps_it_precomputed(tmp_path, tiny_base):
    recipe, registry, entry = _train(tmp_path, tiny_base, {"time_limit_minutes": 30, "batch_size": 4})
    assert entry.manifest["timings"]["reference"] == "precomputed"


def test_the_reference_from_the_frozen_prefix_trains_as_the_adapter_disabled_one(tmp_path, tiny_base):
    """`frozen_prefix`: the bottom block runs once a step for policy and reference, the reference's top block
    is the policy's with the adapter off: the same losses and weights as the full adapter-disabled pass
    (fp32), and no reference pass before training."""
    stage = {"freeze_layers": 1, "mixed_precision": "no", "max_steps": 8}
    runs = {mode: _train(tmp_path / mode, tiny_base, {**stage, "reference": mode})
            for mode in ("adapter_disabled", "frozen_prefix")}
    entries = {mode: entry for mode, (_, _, entry) in runs.items()}
    losses = {m: [h["loss"] for h in e.manifest["history"] if "loss" in h] for m, e in entries.items()}
    assert len(losses["frozen_prefix"]) > 1 and losses["frozen_prefix"] == pytest.approx(losses["adapter_disabled"],
                                                                                         abs=1e-5)
    assert losses["frozen_prefix"][-1] < losses["frozen_prefix"][0]
    for mode, entry in entries.items():
        assert entry.manifest["timings"]["reference"] == mode == entry.manifest["preference"]["reference"]
    metrics = {m: e.manifest["metrics"]["preference_accuracy"] for m, e in entries.items()}
    assert metrics["frozen_prefix"] == metrics["adapter_disabled"]
    assert not (tmp_path / "frozen_prefix" / "runs" / "tiny" / "dpo" / "reference_logps.pt").exists()


def test_auto_takes_the_frozen_prefix_only_below_half_an_epoch(tmp_path, tiny_base):
    """A third of an epoch: no pass over every pair first; a whole epoch: the pass (one precomputed pass costs
    less than a no-grad pass of the top blocks in every step, docs/results.md)."""
    for steps, mode in ((2, "frozen_prefix"), (6, "precomputed")):  # 48 training pairs, 8 a step
        _, _, entry = _train(tmp_path / mode, tiny_base, {"freeze_layers": 1, "max_steps": steps, "batch_size": 8})
        assert entry.manifest["timings"]["reference"] == mode
        assert (tmp_path / mode / "runs" / "tiny" / "dpo" / "reference_logps.pt").exists() == (mode == "precomputed")


def test_a_reference_pass_the_budget_cannot_hold_switches_to_the_frozen_prefix_where_there_is_one(
        tmp_path, tiny_base, monkeypatch):
    import align.stages.dpo_reference as dpo

    monkeypatch.setattr(dpo, "TRAIN_PER_REFERENCE", 1e9)
    _, _, entry = _train(tmp_path, tiny_base, {"time_limit_minutes": 30, "batch_size": 4, "freeze_layers": 1})
    assert entry.manifest["timings"]["reference"] == "frozen_prefix"
    assert dpo.switched_mode(tmp_path / "runs" / "tiny" / "dpo") == "frozen_prefix"


def test_the_switch_projects_the_reference_pass_by_tokens_not_pairs():
    """The rate is per token (the pass runs its shortest pairs first, so a rate per pair taken at its start
    promises too short a pass): 200 of 10,000 tokens in 6 s is 294 s of pass to come and 600 s of training
    (twice the pass, one epoch), which cannot fit in the 500 s left; at 1 s, 149 s can."""
    from types import SimpleNamespace

    from align.stages.dpo_reference import reference_fits

    budget = SimpleNamespace(minutes=10, elapsed=lambda: 100.0, still_to_come=lambda: 0.0)
    ctx = SimpleNamespace(budget=budget, config=SimpleNamespace(epochs=1.0), name="dpo")
    keep_going = reference_fits(ctx, train_tokens=10_000, total_tokens=10_000)
    assert keep_going(100, 1.0)        # under 2% of the tokens: too early to tell
    assert not keep_going(200, 6.0)    # 0.03 s a token: 294 s of pass + 600 s of training > 500 s left
    assert keep_going(200, 1.0)        # 0.005 s a token: 49 s + 100 s fits
