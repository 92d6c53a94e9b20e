"""The PPO stage end to end on a tiny random Llama: a checker's reward is learned (GAE with a value head,
and the critic-free GRPO and RLOO), KL to the reference is zero at step 0 and the reference's log-probs
stay fixed while the policy's move, rewards mix a reward model (or a generative judge, which also judges the
evaluation hook's reward and win rate on the same weights) with a checker and are logged per source,
an interrupted run resumes to the same weights, and a failed reward gate or a bad prompt set is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.errors import AlignError, DataError, TrainingError
from align.models.loading import ModelSource, load_causal_lm, load_tokenizer
from align.pipeline.run import run_recipe
from align.config.loading import validate_recipe
from align.registry.store import Registry
from tests.conftest import write_jsonl

PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(8) for b in range(8)]
DIGIT = {"checker": "regex", "args": {"pattern": "[0-9]"}}
FAST_PPO = {"from": "base", "rewards": [DIGIT], "rollout_batch": 16, "minibatch": 8, "batch_size": 8, "ppo_epochs": 2,
            "max_steps": 16, "lr": 1e-2, "scheduler": "constant", "generation": {"max_new_tokens": 8, "temperature": 1.0, "top_k": 50},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "logging_steps": 4, "save_steps": 4,
            "kl": {"coef": 0.01}, "eval_split": 0.1}


def _recipe(folder: Path, base, stage: dict | None = None, extra_stages: dict | None = None):
    prompts = write_jsonl(folder / "prompts.jsonl", PROMPTS)
    stages = {**(extra_stages or {}), "ppo": {"prompts": str(prompts), **FAST_PPO, **(stage or {})}}
    raw = {"name": "tiny", "base": str(base), "stages": stages}
    return validate_recipe(raw, [], source=str(folder / "r.yaml"))


def _train(folder: Path, base, stage: dict | None = None, **kwargs):
    recipe = _recipe(folder, base, stage, **kwargs)
    registry = Registry(folder / "registry")
    entries = run_recipe(recipe, registry, runs_root=folder / "runs")
    return recipe, registry, entries["ppo"]


def _mean(history: list[dict], key: str, part: slice) -> float:
    values = [h[key] for h in history[part]]
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def gae_run(tmp_path_factory, tiny_base):
    return _train(tmp_path_factory.mktemp("ppo-gae"), tiny_base)



def _lora_trainer(tmp_path, tiny_base, critic: bool, total_updates: int):
    """A PPOTrainer on the tiny model with a fresh LoRA adapter (and a value head when `critic`), rewarded for
    digits; returns (trainer, tokenizer)."""
    from peft import LoraConfig, get_peft_model

    from align.rewards.mix import RewardMix, checker_term
    from align.rl.ppo import PPOTrainer
    from align.rl.settings import PPOSettings
    from align.stages.ppo import build_value_head

    cfg = _recipe(tmp_path, tiny_base).stages["ppo"]
    source = ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base))
    registry = Registry(tmp_path / "registry")
    tokenizer = load_tokenizer(source, registry)
    model = get_peft_model(load_causal_lm(source, registry, dtype="fp32"),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    trainer = PPOTrainer(PPOSettings.from_stage(cfg), model, tokenizer,
                         RewardMix([checker_term("regex", 1.0, {"pattern": "[0-9]"})]),
                         build_value_head(model) if critic else None, total_updates=total_updates)
    return trainer, tokenizer


def test_gae_learns_the_checkers_reward(gae_run):
    _, _, entry = gae_run
    history, metrics = entry.manifest["history"], entry.manifest["metrics"]
    assert _mean(history, "reward", slice(-4, None)) > _mean(history, "reward", slice(0, 4)) + 0.25
    assert metrics["heldout_reward"] > metrics["heldout_reward_before"]  # greedy answers to unseen prompts
    assert metrics["heldout_kl_per_token"] > 0.0
    saved = json.loads((entry.path / "heldout_rewards.json").read_text())  # per prompt, before and after
    assert len(saved["before"]) == len(saved["after"]) == metrics["heldout_prompts"]
    assert metrics["heldout_reward_gain"] == pytest.approx(metrics["heldout_reward"] - metrics["heldout_reward_before"],
                                                           abs=1e-5)


def test_kl_is_zero_at_the_first_step_and_every_figure_is_logged(gae_run):
    _, _, entry = gae_run
    first = entry.manifest["history"][0]
    assert first["kl_per_token"] == 0.0  # a fresh adapter is the reference exactly
    for key in ("reward", "reward/regex", "kl_coef", "entropy", "clip_fraction", "value_loss", "explained_variance",
                "response_length", "eos_rate", "time_generate", "time_score", "time_train"):
        assert key in first, key
    assert entry.manifest["history"][-1]["kl_per_token"] > 0.0
    split = entry.manifest["timings"]["time_split"]
    assert sum(split.values()) == pytest.approx(1.0, abs=0.01)
    assert (entry.path / "rl_curves.png").stat().st_size > 0 and (entry.path / "reward_histogram.png").is_file()


def test_the_registered_adapter_moved_and_the_reference_did_not(gae_run, tiny_base):
    """The adapter-disabled reference equals the untouched base; the policy's log-probs differ from it."""
    _, registry, entry = gae_run
    base = load_causal_lm(ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base)), registry, dtype="fp32")
    from peft import PeftModel

    policy = PeftModel.from_pretrained(load_causal_lm(ModelSource(ref=str(tiny_base), kind="local",
                                                                  path=str(tiny_base)), registry, dtype="fp32"),
                                       str(entry.path / "adapter"))
    ids = torch.tensor([[5, 17, 33, 41, 60, 72, 80, 91]])
    with torch.no_grad():
        reference = base(ids).logits
        with policy.disable_adapter():
            disabled = policy(ids).logits
        trained = policy(ids).logits
    assert torch.allclose(disabled, reference, atol=1e-5)
    assert (trained - reference).abs().max() > 1e-3
    assert (entry.path / "value_head.pt").is_file()


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_estimators_learn_the_reward(estimator, tmp_path, tiny_base):
    stage = {"estimator": estimator, "samples_per_prompt": 4, "kl": {"coef": 0.01, "penalty": "loss"},
             "ppo_epochs": 1, "minibatch": 16, "max_steps": 24}  # one on-policy update per rollout
    _, _, entry = _train(tmp_path, tiny_base, stage)
    history = entry.manifest["history"]
    assert "value_loss" not in history[0] and not (entry.path / "value_head.pt").exists()
    assert _mean(history, "reward", slice(-6, None)) > _mean(history, "reward", slice(0, 4)) + 0.2
    # Steps where some prompt's samples differed (others train nothing); the prompts run once per group, in
    # batches padded differently from the reference's, hence float noise rather than an exact zero.
    trained = [h for h in history if "kl_per_token" in h]
    assert trained[0]["kl_per_token"] == pytest.approx(0.0, abs=1e-5) and trained[-1]["kl_per_token"] > 1e-3


def test_prompts_whose_samples_all_score_alike_are_not_trained_on(tmp_path, tiny_base):
    """A reward every response gets (the pattern `^` matches anything) gives every group zero advantage:
    no row is scored or trained, so the adapter stays at its initial zero update."""
    from safetensors.torch import load_file

    stage = {"estimator": "rloo", "samples_per_prompt": 4, "rewards": [{"checker": "regex", "args": {"pattern": "^"}}],
             "kl": {"coef": 0.01, "penalty": "loss"}, "ppo_epochs": 1, "minibatch": 16, "max_steps": 3}
    _, _, entry = _train(tmp_path, tiny_base, stage)
    history = entry.manifest["history"]
    assert [h["trained_share"] for h in history] == [0.0, 0.0, 0.0]
    assert all(h["reward"] == 1.0 and "kl_per_token" not in h for h in history)
    weights = load_file(str(entry.path / "adapter" / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(float(w.abs().max()) == 0.0 for w in lora_b)


def test_reference_log_probs_stay_fixed_while_the_policys_move(tmp_path, tiny_base):
    """Drive the trainer directly: the same rollouts scored by the reference before and after training
    give the same log-probs; the policy's change."""
    from align.data.tokenize import encode_prompt
    from align.rl.rollout import sample_rollouts

    trainer, tokenizer = _lora_trainer(tmp_path, tiny_base, critic=True, total_updates=20)
    model, cfg = trainer.model, trainer.settings
    rows = [{**row, "messages": [{"role": "user", "content": row["prompt"]}]} for row in PROMPTS[:16]]
    ids = [encode_prompt(tokenizer, r["messages"]) for r in rows]
    torch.manual_seed(0)
    fixed = sample_rollouts(model, tokenizer, rows, ids, cfg.generation, 16)

    def both():
        with trainer.reference_model() as reference:
            ref = trainer.scoring_pass(reference, fixed)["logps"]
        return ref, trainer.scoring_pass(model, fixed)["logps"]

    ref_before, policy_before = both()
    assert torch.equal(ref_before, policy_before)
    for step in range(3):
        trainer.step(rows, ids, step)
    ref_after, policy_after = both()
    assert torch.equal(ref_after, ref_before)
    assert (policy_after - policy_before).abs().max() > 1e-3


def test_rewards_mix_a_reward_model_and_a_checker_logged_per_source(tmp_path, tiny_base):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"q{i}", "chosen": "1 2 3", "rejected": "no"}
                                                   for i in range(24)])
    reward_stage = {"kind": "reward", "from": "base", "data": str(prefs), "max_steps": 4, "batch_size": 4,
                    "lr": 1e-3, "gate": {"min_accuracy": 0.0}, "save_steps": 4}
    stage = {"rewards": [{"model": "rm", "weight": 0.5}, DIGIT], "max_steps": 3}
    _, _, entry = _train(tmp_path, tiny_base, stage, extra_stages={"rm": reward_stage})
    first = entry.manifest["history"][0]
    assert {"reward/reward:rm", "reward/regex"} <= set(first)
    names = [s["name"] for s in entry.manifest["rl"]["rewards"]]
    assert names == ["reward:rm", "regex"]
    assert entry.manifest["rl"]["rewards"][0]["model"] == {"source": "registry", "ref": "tiny/rm@1"}
    expected = 0.5 * first["reward/reward:rm"] + first["reward/regex"]
    assert first["reward"] == pytest.approx(expected, abs=1e-5)


def test_a_judge_term_is_mixed_logged_per_source_and_judges_the_eval_hook_on_the_same_weights(
        tmp_path, tiny_base, tiny_judge, monkeypatch):
    import weakref

    import align.eval.judges
    import align.models.loading
    import align.rewards.judge

    loads = []
    load = align.models.loading.load_causal_lm
    monkeypatch.setattr(align.models.loading, "load_causal_lm",
                        lambda source, *a, **k: loads.append(source.path) or load(source, *a, **k))
    monkeypatch.setattr(align.eval.judges, "_JUDGES", {})  # no judge loaded by an earlier test
    monkeypatch.setattr(align.rewards.judge, "_LOADED", weakref.WeakValueDictionary())
    rubric = "Does the response give a number?"
    judge = {"judge": str(tiny_judge), "rubric": rubric}
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    raw = {"name": "tiny", "base": str(tiny_base),
           "stages": {"ppo": {"prompts": str(prompts), **FAST_PPO, "estimator": "grpo", "samples_per_prompt": 2,
                              "rollout_batch": 4, "minibatch": 4, "max_steps": 2, "eval_limit": 2,
                              "rewards": [{**judge, "weight": 0.5}, DIGIT]}},
           "eval": {"prompts": str(prompts), "metrics": ["reward", "win_rate"], "judge": judge, "limit": 3,
                    "generation": {"max_new_tokens": 4}}}
    recipe = validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))
    entry = run_recipe(recipe, Registry(tmp_path / "registry"), runs_root=tmp_path / "runs")["ppo"]
    name = f"judge:{tiny_judge}"
    first = entry.manifest["history"][0]
    assert first["reward"] == pytest.approx(0.5 * first[f"reward/{name}"] + first["reward/regex"], abs=1e-5)
    assert entry.manifest["rl"]["rewards"][0] == {"name": name, "judge": {"source": "local", "path": str(tiny_judge)},
                                                  "rubric": rubric, "judge_score": "yes_no", "weight": 0.5}
    metrics = entry.manifest["metrics"]
    assert f"heldout_reward/{name}_before" in metrics and f"heldout_reward/{name}" in metrics
    assert entry.manifest["baseline"]["metrics"]["win_rate"] == 0.5  # the parent against the base: itself
    assert 0 <= metrics["win_rate"] <= 1 and metrics["win_rate_against"] == str(tiny_base)
    assert metrics["reward_mean"] != 0 and "reward_mean" in entry.manifest["baseline"]["metrics"]
    assert loads.count(str(tiny_judge)) == 1  # one copy of the judge for the reward term and the eval hook


def test_a_reward_model_that_failed_its_gate_is_refused(tmp_path, tiny_base):
    # Contradictory pairs (each preference appears both ways): no model ranks them all right.
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"q{i}", "chosen": "ab"[i % 2], "rejected": "ba"[i % 2]}
                                                   for i in range(12)])
    reward_stage = {"kind": "reward", "from": "base", "data": str(prefs), "max_steps": 1, "batch_size": 4,
                    "gate": {"min_accuracy": 1.0}, "eval_split": 0.5}
    with pytest.raises(AlignError, match="failed its quality gate"):
        _train(tmp_path, tiny_base, {"rewards": [{"model": "rm"}]}, extra_stages={"rm": reward_stage})
    assert Registry(tmp_path / "registry").find("tiny/ppo") is None


def test_prompts_without_answers_are_refused_before_training(tmp_path, tiny_base):
    recipe = _recipe(tmp_path, tiny_base, {"rewards": [{"checker": "math_answer"}]})
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:3] + [{"prompt": "What is 1 + 1?"}])
    from align.stages.context import StageContext
    from align.stages.ppo import PPO

    registry = Registry(tmp_path / "registry")
    ctx = StageContext(recipe=recipe, name="ppo", config=recipe.stages["ppo"], registry=registry,
                       parent=ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base)),
                       runs_root=tmp_path / "runs")
    with pytest.raises(DataError, match="row 3: checker 'math_answer' needs field"):
        PPO(ctx).run()
    assert not (tmp_path / "runs" / "tiny" / "ppo" / "checkpoint-4").exists()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_base, monkeypatch):
    """Stopped by a signal at step 2 (between the checkpoints at 0 and 3), with micro-batches of 4 accumulated
    into minibatches of 8, the resumed run samples the same responses (the sampling RNG is part of the resumed
    state) and ends with every logged figure and every trained weight, value head included, within 1e-6."""
    import align.stages.ppo as ppo_stage

    stage = {"max_steps": 6, "save_steps": 3, "batch_size": 4}
    _, _, straight = _train(tmp_path / "straight", tiny_base, stage)

    class StopAfterTwo(ppo_stage.StopRequest):
        def __enter__(self):
            super().__enter__()
            self.calls = 0
            return self

        @property
        def requested(self):
            self.calls += 1
            return self.calls >= 2

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(ppo_stage, "StopRequest", StopAfterTwo)
    with pytest.raises(TrainingError, match="interrupted at step 2"):
        _train(tmp_path / "resumed", tiny_base, stage)
    monkeypatch.undo()
    assert (tmp_path / "resumed" / "runs" / "tiny" / "ppo" / "checkpoint-2").is_dir()
    _, _, resumed = _train(tmp_path / "resumed", tiny_base, stage)
    assert resumed.manifest["timings"]["resumed_from"].endswith("checkpoint-2")

    def figures(entry):
        return [{k: v for k, v in h.items() if not k.startswith("time_") and k != "step_seconds"}
                for h in entry.manifest["history"]]

    a, b = figures(straight), figures(resumed)
    assert len(a) == len(b) == 6 and [h.keys() for h in a] == [h.keys() for h in b]
    assert [h["generated_tokens"] for h in a] == [h["generated_tokens"] for h in b]  # the same samples
    for x, y in zip(a, b):
        for key in x:
            assert y[key] == pytest.approx(x[key], abs=1e-6, rel=0), (x["step"], key)
    from safetensors.torch import load_file

    for name, load in (("adapter/adapter_model.safetensors", load_file), ("value_head.pt", torch.load)):
        x, y = load(straight.path / name), load(resumed.path / name)
        assert x.keys() == y.keys() and x
        assert all(torch.allclose(x[k], y[k], atol=1e-6, rtol=0) for k in x), name


def test_full_fine_tuning_from_a_lora_entry_trains_the_merged_weights(tmp_path, tiny_base):
    """`method: full` from a LoRA entry trains every merged weight; it used to log 0 trainable parameters, run,
    and register weights equal to the merged parent's (PEFT loads an adapter frozen)."""
    from safetensors.torch import load_file

    from tests.tiny_entries import register_adapter, unmerged

    parent = register_adapter(Registry(tmp_path / "registry"), tiny_base, name="tiny/lora")
    _, _, entry = _train(tmp_path, tiny_base, {"from": parent.ref, "method": "full", "max_steps": 2, "lr": 1e-3})
    assert entry.artifact["type"] == "full" and entry.manifest["parent"] == {"source": "registry", "ref": parent.ref}
    merged = unmerged(parent).merge_and_unload().state_dict()
    trained = load_file(str(entry.file("model", "model.safetensors")))
    moved = [k for k in trained if not torch.equal(trained[k], merged[k])]
    assert len(moved) > len(trained) // 2, f"{len(moved)} of {len(trained)} tensors trained"


def test_a_rerun_recipe_reports_its_finished_stages_and_goes_on(tmp_path, tiny_base):
    """After `--stage sft` (as after a later stage failed), running the whole recipe reports the finished SFT
    entry and trains PPO from it; running it once more reports both. Nothing is registered twice: PPO used to
    register a copy without training, and SFT a copy trained one step past max_steps."""
    from tests.conftest import FAST_STAGE, SFT_ROWS

    sft = {"data": str(write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)), **FAST_STAGE, "max_steps": 2}
    recipe = _recipe(tmp_path, tiny_base, {"from": "sft", "max_steps": 2}, extra_stages={"sft": sft})
    registry, runs = Registry(tmp_path / "registry"), tmp_path / "runs"
    assert run_recipe(recipe, registry, only=["sft"], runs_root=runs)["sft"].ref == "tiny/sft@1"
    entries = run_recipe(recipe, registry, runs_root=runs)
    assert entries["sft"].ref == "tiny/sft@1"
    assert entries["ppo"].manifest["parent"] == {"source": "registry", "ref": "tiny/sft@1"}
    again = run_recipe(recipe, registry, runs_root=runs)
    assert {name: entry.ref for name, entry in again.items()} == {"sft": "tiny/sft@1", "ppo": "tiny/ppo@1"}
    assert [e.ref for e in registry.list()] == ["tiny/ppo@1", "tiny/sft@1"]


def test_plan_time_settings_errors_are_named(tmp_path, tiny_base):
    from align.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _recipe(tmp_path, tiny_base, {"estimator": "grpo", "samples_per_prompt": 1})
    assert "samples_per_prompt >= 2" in str(info.value)
    with pytest.raises(ConfigError) as info:
        _recipe(tmp_path, tiny_base, {"samples_per_prompt": 3})
    assert "multiple of samples_per_prompt" in str(info.value)


def test_critic_on_its_own_adapter_trains_and_stays_out_of_the_policy(tmp_path, tiny_base):
    _, _, entry = _train(tmp_path, tiny_base, {"value": "adapter", "max_steps": 6})
    history = entry.manifest["history"]
    assert all(h["value_loss"] >= 0 for h in history) and history[-1]["value_mean"] != 0.0  # the critic moved
    assert not (entry.path / "adapter" / "critic").exists() and (entry.path / "critic").is_dir()
    assert entry.manifest["rl"]["critic_adapter"] == "critic"
    from peft import PeftModel

    source = ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base))
    policy = PeftModel.from_pretrained(load_causal_lm(source, Registry(tmp_path / "r2"), dtype="fp32"),
                                       str(entry.path / "adapter"))
    assert list(policy.peft_config) == ["default"]


# ------------------------------------------------------------------------------------------ non-finite loss


@pytest.mark.parametrize("how", ["injected", "exploding"])
def test_a_non_finite_loss_stops_with_the_step_and_no_checkpoint_after_it(how, tmp_path, tiny_base, monkeypatch):
    """`injected`: the policy loss turns nan at step 3 (checkpoints every 2 steps); `exploding`: full fine-tuning
    at lr 1e38 overflows on its own. Either way the run stops naming the step, registers nothing, and the newest
    checkpoint is from before that step."""
    import align.rl.ppo as ppo_loop

    if how == "injected":
        real = ppo_loop.ppo_policy_loss

        def poisoned(*args, **kwargs):
            loss, *rest = real(*args, **kwargs)
            return (loss * float("nan"), *rest) if poisoned.step >= 3 else (loss, *rest)

        real_step = ppo_loop.PPOTrainer.step

        def step(self, rows, ids, index):
            poisoned.step = index + 1
            return real_step(self, rows, ids, index)

        monkeypatch.setattr(ppo_loop, "ppo_policy_loss", poisoned)
        monkeypatch.setattr(ppo_loop.PPOTrainer, "step", step)
        stage, match = {"max_steps": 6, "save_steps": 2}, r"loss became nan at step 3\b"
    else:
        stage = {"max_steps": 6, "save_steps": 1, "method": "full", "lr": 1e30}
        match = r"loss became (nan|inf|-inf) at step \d+"
    with pytest.raises(TrainingError, match=match) as info:
        _train(tmp_path, tiny_base, stage)
    assert Registry(tmp_path / "registry").find("tiny/ppo") is None
    from align.stages.run_folder import latest_checkpoint

    newest = latest_checkpoint(tmp_path / "runs" / "tiny" / "ppo")
    failed_at = int(str(info.value).split(" at step ")[1].split(";")[0].split()[0])
    assert newest is None or int(newest.name.split("-")[1]) < failed_at
    if how == "injected":
        assert newest.name == "checkpoint-2"


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_in_use(tmp_path, tiny_base, monkeypatch):
    """The save of checkpoint-4 dies after part of its state file was written: the half-written folder keeps its
    temporary name, checkpoint-2 stays the one resumed from, and the rerun ends at the last step."""
    import align.stages.ppo as ppo_stage
    from align.stages.run_folder import latest_checkpoint

    real_save = torch.save

    def torn_save(obj, path, *args, **kwargs):
        if ".checkpoint-4.partial" in str(path):
            Path(path).write_bytes(b"\0" * 64)
            raise OSError("disk full while writing the checkpoint")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ppo_stage.torch, "save", torn_save)
    stage = {"max_steps": 6, "save_steps": 2}
    with pytest.raises(OSError, match="disk full"):
        _train(tmp_path, tiny_base, stage)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "tiny" / "ppo"
    assert (run_dir / ".checkpoint-4.partial").is_dir() and not (run_dir / "checkpoint-4").exists()
    assert latest_checkpoint(run_dir) == run_dir / "checkpoint-2"
    _, _, entry = _train(tmp_path, tiny_base, stage)
    assert entry.manifest["timings"]["resumed_from"] == str(run_dir / "checkpoint-2")
    assert entry.manifest["timings"]["steps"] == 6


def test_paired_gain_compares_the_same_prompts():
    from align.stages.ppo import paired_gain

    out = paired_gain([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 2.0, 5.0])
    assert out["gain"] == pytest.approx(0.25)
    # differences 0.5, 0.5, -1, 1: sample std 0.866, over sqrt(4)
    assert out["gain_stderr"] == pytest.approx(0.4330127, rel=1e-6)
    assert out["improved_share"] == 0.75 and out["worse_share"] == 0.25
    assert paired_gain([], []) == {} and paired_gain([1.0], [1.0, 2.0]) == {}


def test_the_heldout_kl_is_exact_and_never_negative(tmp_path, tiny_base, monkeypatch):
    """`heldout_kl_per_token` is the exact KL over the vocabulary at each response position: on held-out
    responses where the k1 estimate (log pi - log ref of the drawn tokens) is negative, it is the mean of
    the exact per-position KL, >= 0 (before: the negative k1 mean)."""
    from align.data.tokenize import encode_prompt
    from align.models.logprobs import causal_parts, distribution_kl, labelled_hidden
    from align.objectives.kl import kl_per_token
    from align.objectives.stats import masked_mean
    from align.rl.rollout import sample_rollouts
    import align.stages.ppo as ppo_stage
    import align.stages.ppo_heldout as ppo_heldout

    trainer, tokenizer = _lora_trainer(tmp_path, tiny_base, critic=False, total_updates=1)
    model, cfg = trainer.model, trainer.settings
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    rows = [{**row, "messages": [{"role": "user", "content": row["prompt"]}]} for row in PROMPTS[:4]]
    ids = [encode_prompt(tokenizer, r["messages"]) for r in rows]
    with trainer.reference_model() as reference:  # the reference's own greedy answers: an unlucky draw for k1
        greedy = cfg.generation.model_copy(update={"temperature": 0.0})
        fixed = sample_rollouts(reference, tokenizer, rows, ids, greedy, 4)
    monkeypatch.setattr(ppo_heldout, "sample_rollouts", lambda *args, **kwargs: fixed)
    policy = trainer.scoring_pass(model, fixed, grouped=False)["logps"]
    with trainer.reference_model() as reference:
        ref = trainer.scoring_pass(reference, fixed, grouped=False)["logps"]
    k1 = float(masked_mean(kl_per_token(policy, ref, "k1"), fixed.mask.float()))
    assert k1 < 0.0  # the estimate the figure used to report

    figures, _ = ppo_stage.heldout_figures(trainer, [{**r, "prompt_ids": i} for r, i in zip(rows, ids)])
    with torch.no_grad():
        hidden = labelled_hidden(model, fixed.input_ids, fixed.attention_mask, fixed.labels)
        with trainer.reference_model() as reference:
            ref_hidden = labelled_hidden(reference, fixed.input_ids, fixed.attention_mask, fixed.labels)
        weight = causal_parts(model)[1].weight
        exact = distribution_kl(hidden, weight, ref_hidden, weight, trainer.temperature)
    assert figures["kl_per_token"] > 0.0
    assert figures["kl_per_token"] == pytest.approx(float(exact.mean()), rel=1e-4)
