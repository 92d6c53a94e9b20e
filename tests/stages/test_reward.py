"""The reward stage end to end on a tiny random Llama: it learns a separable toy preference, its score head
survives save and reload (LoRA and full), the quality gate marks a weak entry and PPO planning refuses it,
and `align score` reads the entry back."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from align.cli.main import main
from align.data.prepare import prepare_pairs
from align.errors import ConfigError, TrainingError
from align.models.loading import ModelSource, load_tokenizer
from align.pipeline.run import run_recipe
from align.pipeline.plan import make_plan
from align.config.loading import validate_recipe
from align.registry.store import Registry
from align.rewards.scoring import load_reward_model, pair_metrics, score_pairs
from tests.conftest import write_jsonl

KIND = ["Sure, here is some help.", "Happy to help you with that.", "Of course, glad to help."]
RUDE = ["No. Go away.", "I refuse, stop asking me.", "Leave me alone now."]
FAST_REWARD = {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "logging_steps": 5, "save_steps": 20,
               "eval_split": 0.25, "scheduler": "constant", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
               "gate": {"min_accuracy": 0.8}}


def preference_rows(count: int = 64) -> list[dict]:
    """Kind answers preferred over rude ones, whatever the question: separable from the response alone."""
    rng = random.Random(0)
    return [{"prompt": f"Question {i}: can you help with task {rng.randint(0, 99)}?",
             "chosen": rng.choice(KIND), "rejected": rng.choice(RUDE)} for i in range(count)]


@dataclass
class RewardRun:
    folder: Path
    recipe: object
    registry: Registry
    entry: object


def _raw(folder: Path, base, stage: dict | None = None, stages: dict | None = None) -> dict:
    data = write_jsonl(folder / "prefs.jsonl", preference_rows())
    return {"name": "tiny", "base": str(base),
            "stages": stages or {"reward": {"data": str(data), **FAST_REWARD, **(stage or {})}}}


def _train(folder: Path, base, stage: dict | None = None) -> RewardRun:
    recipe = validate_recipe(_raw(folder, base, stage), [], source=str(folder / "r.yaml"))
    registry = Registry(folder / "registry")
    produced = run_recipe(recipe, registry, runs_root=folder / "runs")
    entry = registry.resolve("tiny/reward")
    assert entry.ref == produced["reward"].ref == "tiny/reward@1"
    return RewardRun(folder, recipe, registry, entry)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_base) -> RewardRun:
    return _train(tmp_path_factory.mktemp("rm-lora"), tiny_base)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_base) -> RewardRun:
    return _train(tmp_path_factory.mktemp("rm-full"), tiny_base, {"method": "full", "lr": 1e-3})


def test_learns_a_separable_preference(lora_run):
    manifest = lora_run.entry.manifest
    assert manifest["metrics"]["pairwise_accuracy"] >= 0.9
    assert manifest["metrics"]["gap_mean"] > 1.0
    losses = [h["loss"] for h in manifest["history"] if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    assert manifest["gate"] == {"min_accuracy": 0.8, "accuracy": manifest["metrics"]["pairwise_accuracy"],
                                "passed": True}


def test_manifest_records_kind_lineage_data_and_pictures(lora_run, tiny_base):
    entry = lora_run.entry
    assert entry.kind == "reward"
    assert entry.artifact["type"] == "adapter" and entry.artifact["head"] == "score"
    assert entry.manifest["parent"] == {"source": "local", "path": str(tiny_base)}
    assert entry.manifest["data"]["train"]["rows"] == 64 and entry.manifest["data"]["train"]["kept"] == 64
    assert (entry.path / "score_histogram.png").stat().st_size > 1000
    assert (entry.path / "training_curve.png").is_file()


def _reloaded_metrics(run: RewardRun) -> dict:
    """Held-out pair metrics of the entry as loaded back from the registry (a fresh process would do this)."""
    source = ModelSource(ref=run.entry.ref, kind="registry", entry=run.entry)
    model, tokenizer = load_reward_model(source, run.registry)
    _, heldout, _ = prepare_pairs(run.recipe, run.recipe.stages["reward"], load_tokenizer(source, run.registry))
    return pair_metrics(*score_pairs(model, heldout, tokenizer.pad_token_id))


@pytest.mark.parametrize("which", ["lora_run", "full_run"])
def test_score_head_survives_save_and_reload(which, request):
    run = request.getfixturevalue(which)
    recorded = run.entry.manifest["metrics"]
    reloaded = _reloaded_metrics(run)
    # A lost or re-initialized head gives different scores; the trained one gives the recorded ones
    # (to bf16 precision: scoring uses bf16 autocast where the CPU has it, and the reload merges the adapter).
    for key in ("chosen_mean", "rejected_mean", "gap_mean"):
        assert reloaded[key] == pytest.approx(recorded[key], abs=0.05), key
    assert reloaded["pairwise_accuracy"] == recorded["pairwise_accuracy"]


def test_full_fine_tuning_learns_too(full_run):
    assert full_run.entry.artifact["type"] == "full"
    assert full_run.entry.manifest["metrics"]["pairwise_accuracy"] >= 0.9


def test_hinge_loss_with_per_pair_margins_learns(tmp_path, tiny_base):
    raw = _raw(tmp_path, tiny_base, {"loss": "hinge", "margin_field": "m"})
    rows = [{**row, "m": 1.0} for row in preference_rows()]
    write_jsonl(Path(raw["stages"]["reward"]["data"]), rows)
    recipe = validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))
    entry = run_recipe(recipe, Registry(tmp_path / "registry"), runs_root=tmp_path / "runs")["reward"]
    assert entry.manifest["config"]["loss"] == "hinge"
    assert entry.manifest["metrics"]["pairwise_accuracy"] >= 0.9


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory, tiny_base) -> RewardRun:
    """One tiny step at a tiny learning rate cannot reach accuracy 1.0 on held-out pairs."""
    return _train(tmp_path_factory.mktemp("rm-weak"), tiny_base,
                  {"max_steps": 1, "lr": 1e-7, "gate": {"min_accuracy": 1.0}})


def test_failing_the_gate_is_recorded(failed_run):
    gate = failed_run.entry.manifest["gate"]
    assert gate["passed"] is False and gate["accuracy"] < 1.0


def _ppo_recipe(run: RewardRun, allow: bool = False, ref: str = "tiny/reward"):
    prompts = write_jsonl(run.folder / "prompts.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])
    raw = {"name": "tiny", "base": run.recipe.base, "registry": str(run.registry.root),
           "stages": {"ppo": {"prompts": str(prompts), "rewards": [{"model": ref}], "allow_failed_gate": allow}}}
    return validate_recipe(raw, [], source=str(run.folder / "ppo.yaml"))


def _problems(recipe, registry) -> list[str]:
    with pytest.raises(ConfigError) as err:
        make_plan(recipe, registry)
    return [str(p) for p in err.value.problems]


def test_ppo_planning_refuses_a_reward_model_that_failed_its_gate(failed_run):
    problems = _problems(_ppo_recipe(failed_run), failed_run.registry)
    assert any(p.startswith("stages.ppo.rewards[0].model: tiny/reward@1 failed its quality gate") for p in problems)
    overridden = make_plan(_ppo_recipe(failed_run, allow=True), failed_run.registry)  # plans without problems
    assert "reward: registry entry tiny/reward@1" in overridden.describe()


def test_ppo_planning_refuses_a_model_that_is_not_a_reward_model(lora_run, tiny_base):
    problems = _problems(_ppo_recipe(lora_run, ref=str(tiny_base)), lora_run.registry)
    assert any(p.startswith("stages.ppo.rewards[0].model:") and "not a sequence-classification model" in p
               for p in problems)
    raw = _raw(lora_run.folder, tiny_base, stages={
        "sft": {"data": str(write_jsonl(lora_run.folder / "sft.jsonl", [{"prompt": "a", "completion": "b"}]))},
        "ppo": {"prompts": str(lora_run.folder / "prefs.jsonl"), "rewards": [{"model": "sft"}]}})
    problems = _problems(validate_recipe(raw, [], source="r.yaml"), lora_run.registry)
    assert "stages.ppo.rewards[0].model: stage 'sft' is a sft stage, not a reward model" in problems


def test_align_score_command(lora_run, capsys):
    out = lora_run.folder / "scores.jsonl"
    code = main(["--registry", str(lora_run.registry.root), "score", "tiny/reward",
                 "--data", str(lora_run.folder / "prefs.jsonl"), "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 64 and summary["pairwise_accuracy"] >= 0.9
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 64 and sum(r["chosen_score"] > r["rejected_score"] for r in rows) >= 58


def test_align_score_refuses_a_policy(lora_run, tiny_base, capsys):
    code = main(["--registry", str(lora_run.registry.root), "score", str(tiny_base),
                 "--data", str(lora_run.folder / "prefs.jsonl")])
    assert code == 2
    assert "not a sequence-classification model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ reliability


def test_interrupted_run_resumes_to_the_same_result(lora_run, tmp_path, tiny_base):
    runs_root = tmp_path / "runs"
    shutil.copytree(lora_run.folder / "runs", runs_root)
    run_dir = runs_root / "tiny" / "reward"
    shutil.rmtree(run_dir / "checkpoint-30")  # as if stopped after the checkpoint at step 20
    (run_dir / "registered.json").unlink()  # and so never registered
    registry = Registry(tmp_path / "registry")
    run_recipe(lora_run.recipe, registry, runs_root=runs_root)
    resumed, original = registry.resolve("tiny/reward").manifest, lora_run.entry.manifest
    assert resumed["timings"]["resumed_from"] == str(run_dir / "checkpoint-20")
    assert resumed["timings"]["steps"] == 30
    losses = [[h["loss"] for h in m["history"] if "loss" in h] for m in (resumed, original)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert resumed["metrics"]["gap_mean"] == pytest.approx(original["metrics"]["gap_mean"], abs=1e-3)


def test_time_limit_stops_early_and_still_registers(tmp_path, tiny_base):
    run = _train(tmp_path, tiny_base, {"time_limit_minutes": 1e-6})
    timings = run.entry.manifest["timings"]
    assert timings["stopped_at_time_limit"] is True and timings["steps"] == 1


def test_exploding_loss_stops_and_registers_nothing(tmp_path, tiny_base):
    recipe = validate_recipe(_raw(tmp_path, tiny_base, {"method": "full", "lr": 1e38}), [], source="r.yaml")
    registry = Registry(tmp_path / "registry")
    with pytest.raises(TrainingError, match=r"loss became (nan|inf|-inf) at step \d+"):
        run_recipe(recipe, registry, runs_root=tmp_path / "runs")
    assert registry.list() == []


def test_gradient_checkpointing_trains_the_same(tmp_path, tiny_base):
    """Recomputed activations (and the per-row pass they force) give the kept activations' loss curve (fp32)."""
    runs = [_train(tmp_path / str(on), tiny_base, {"gradient_checkpointing": on, "mixed_precision": "no"})
            for on in (False, True)]
    losses = [[h["loss"] for h in run.entry.manifest["history"] if "loss" in h] for run in runs]
    assert len(losses[0]) == len(losses[1]) > 3
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)  # summation order differs between the passes
    assert losses[1][-1] < losses[1][0]


def test_eager_attention_trains_the_same(tmp_path, tiny_base, monkeypatch):
    """`attention: eager` reaches the model that trains, and gives SDPA's loss curve (fp32)."""
    from align.models import loading
    from align.models.loading import use_attention

    kernels = []

    def spy(model, name):
        model = use_attention(model, name)
        kernels.append(model.config._attn_implementation)
        return model

    monkeypatch.setattr(loading, "use_attention", spy)  # as the stage's model builder calls it
    runs = [_train(tmp_path / kernel, tiny_base, {"attention": kernel, "mixed_precision": "no"})
            for kernel in ("auto", "eager")]
    assert kernels[0] == "sdpa" and set(kernels[1:]) == {"eager"}
    losses = [[h["loss"] for h in run.entry.manifest["history"] if "loss" in h] for run in runs]
    assert len(losses[0]) == len(losses[1]) > 3
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)
    assert losses[1][-1] < losses[1][0]


def test_a_batch_split_into_passes_trains_the_same(tmp_path, tiny_base):
    """`max_pass_tokens` below the batch's size: several passes a step, the one-pass loss curve (fp32)."""
    runs = [_train(tmp_path / str(budget), tiny_base, {"max_pass_tokens": budget, "mixed_precision": "no"})
            for budget in (None, 64)]
    losses = [[h["loss"] for h in run.entry.manifest["history"] if "loss" in h] for run in runs]
    assert len(losses[0]) == len(losses[1]) > 3
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert losses[1][-1] < losses[1][0]
