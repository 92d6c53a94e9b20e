"""Several processes on CPU (gloo), two at a time, on the tiny model.

- The collective helpers PPO uses (whitening, masked moments, explained variance, weighted figures, summed
  gradients, reward normalization moments, the KL figure that drives the adaptive controller) give, on two
  processes holding different rows, what the single-process functions give on the rows concatenated; and
  one PPO update on two processes (half the rows each) equals one process's update on all the rows.
- The length-grouped sampler, sharded by accelerate, hands each process its own slice of every global batch.
- `align run --nproc 2` (accelerate launch underneath) runs SFT, reward, DPO and PPO; SFT, reward and DPO log,
  step by step, the losses one process logs with the same global batch (batch_size 2x); each stage registers
  exactly one entry; the run folder and the checkpoint record 2 processes, and one process refuses to resume them.

Tolerance: per-step losses agree within 1e-4 relative (measured: ~2e-7 for SFT, ~1e-5 for DPO, whose
reference log-probs are computed in differently padded batches); the statistics within 1e-5.

This file is also the worker script: `torchrun --nproc_per_node 2 tests/test_distributed.py stats OUT`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4  # relative, per-step losses: 2 processes vs 1 with the same global batch


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


# ------------------------------------------------------------------------------------------ worker


def _rank_data(rank: int) -> dict:
    """Different rows (and row counts) on each process."""
    generator = torch.Generator().manual_seed(100 + rank)
    rows, width = 3 + 2 * rank, 5
    return {"values": torch.randn(rows, width, generator=generator),
            "mask": (torch.rand(rows, width, generator=generator) > 0.3).float(),
            "returns": torch.randn(rows, width, generator=generator),
            "old_logps": -torch.rand(rows, width, generator=generator) * 3,
            "ref_logps": -torch.rand(rows, width, generator=generator) * 3,
            "entropy": torch.rand(rows, width, generator=generator) * 2,
            "totals": torch.randn(4, generator=generator) * (1 + rank)}


PPO_STAGE = {"estimator": "rloo", "samples_per_prompt": 2, "rollout_batch": 8, "minibatch": 8, "batch_size": 3,
             "ppo_epochs": 1, "lr": 1e-2, "scheduler": "constant", "max_grad_norm": 100.0,
             "kl": {"coef": 0.05, "penalty": "reward", "adaptive": False}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
             "rewards": [{"checker": "regex", "args": {"pattern": "[0-9]"}}], "mixed_precision": "no"}


def _ppo_update(base: Path, folder: Path, rows: slice) -> tuple[dict, dict]:
    """One PPO update (one minibatch, one optimizer step) on `rows` of 8 fixed rollouts; returns the trained
    weights after it and the update's figures. Under 2 processes each passes its half of the rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.config.loading import validate_recipe
    from align.rewards.mix import RewardMix
    from align.rl.ppo import Experience, PPOTrainer
    from align.rl.rollout import Rollouts, pack
    from align.rl.settings import PPOSettings
    from align.stages.ppo import per_process_config

    prompts = folder / "ppo_prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 1 + 1?"}) + "\n")
    recipe = validate_recipe({"name": "t", "base": str(base), "stages": {"ppo": {"prompts": str(prompts),
                                                                             **PPO_STAGE}}}, [])
    cfg = per_process_config(recipe.stages["ppo"], "ppo")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trainer = PPOTrainer(PPOSettings.from_stage(cfg), model, tokenizer, RewardMix([]), total_updates=4)
    generator = torch.Generator().manual_seed(7)
    prompt_ids = [torch.randint(10, 300, (3 + i % 3,), generator=generator).tolist() for i in range(8)]
    responses = [torch.randint(10, 300, (2 + (5 * i) % 4,), generator=generator).tolist() for i in range(8)]
    advantages = torch.randn(8, 12, generator=generator)
    ids, attention, labels = pack(prompt_ids[rows], responses[rows], tokenizer.pad_token_id)
    rollouts = Rollouts(rows=[{}] * len(ids), texts=[""] * len(ids), input_ids=ids, attention_mask=attention,
                        labels=labels, ended=torch.ones(len(ids), dtype=torch.bool))
    mask = rollouts.mask.float()
    old = trainer.scoring_pass(model, rollouts)["logps"]
    with trainer.reference_model() as reference:
        ref = trainer.scoring_pass(reference, rollouts)["logps"]
    exp = Experience(rollouts=rollouts, mask=mask, old_logps=old, ref_logps=ref, entropy=None, values=None,
                     scores=torch.zeros(len(ids)), per_source={}, advantages=advantages[rows, :mask.size(1)] * mask,
                     returns=None, sampled=rollouts, sampled_scores=torch.zeros(len(ids)))
    figures = trainer.update(exp, step=0)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return weights, figures


def _fsdp_passes(base: Path) -> dict:
    """FSDP2 (parameters sharded between the two processes): our direct trunk-and-head log-prob pass entered
    through the model's forward (`distributed.call_through`), its backward, and the full state dict gathered
    on main and loaded into a fresh unsharded copy (`align.stages.sharded.load_whole`)."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from align.runtime import distributed
    from align.models.logprobs import sequence_logps
    from align.stages.sharded import load_whole

    def build(seed: int):
        torch.manual_seed(seed)
        return get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                              LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    ids = torch.tensor([[1, 5, 9, 3, 7, 8], [2, 4, 6, 8, 1, 1]])
    labels = ids.clone()
    labels[:, :2] = -100
    model = build(0)
    with torch.no_grad():
        whole = sequence_logps(model, ids, torch.ones_like(ids), labels)[0]
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = distributed.call_through(model, sequence_logps, ids, torch.ones_like(ids), labels)[0]
    sharded.sum().backward()
    grads = [p.grad is not None for p in model.parameters() if p.requires_grad]
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result = {"whole": whole, "sharded": sharded.detach(), "all_grads": all(grads) and bool(grads)}
    if distributed.is_main():
        with torch.no_grad():
            result["reloaded"] = sequence_logps(load_whole(build(1), state), ids, torch.ones_like(ids), labels)[0]
    return result


def _stop_decisions(rank: int) -> dict:
    """The Trainer callbacks' stop decisions when one process alone was signalled (rank 1) or alone passed
    the time limit (rank 0): (should_training_stop, flag the stage reads afterwards) on each process."""
    from align.stages.callbacks import safety_callbacks

    state = SimpleNamespace(global_step=1)
    stopper = safety_callbacks(None)[0]
    stopper._stop.requested = rank == 1
    signalled = SimpleNamespace(should_save=False, should_training_stop=False)
    stopper.on_step_end(None, state, signalled)
    limit = safety_callbacks(1.0)[1]
    if rank == 0:
        limit.budget.started -= 120  # two minutes into the stage, against a one-minute limit
    timed = SimpleNamespace(should_save=False, should_training_stop=False)
    limit.on_step_end(None, state, timed)
    return {"signal": (signalled.should_training_stop, signalled.should_save, stopper.requested),
            "time_limit": (timed.should_training_stop, timed.should_save, limit.reached)}


def _stats_worker(out: Path, base: Path) -> None:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from align.runtime import distributed
    from align.data.sampling import LengthGroupedEpochSampler
    from align.objectives.kl import AdaptiveKL
    from align.objectives.stats import explained_variance, masked_moments, whiten
    from align.rewards.mix import RewardMix, RewardTerm
    from align.rl.ppo import PPOTrainer

    distributed.init()
    rank = distributed.rank()
    data = _rank_data(rank)
    result = {"world_size": distributed.world_size(), "backend": torch.distributed.get_backend()}
    reduce = distributed.reducer()  # the statistics' own formulas, pooled over both processes
    result["whitened"] = whiten(data["values"], data["mask"], reduce=reduce)
    result["moments"] = masked_moments(data["values"], data["mask"], reduce=reduce)
    result["explained_variance"] = explained_variance(data["values"], data["returns"], data["mask"], reduce=reduce)
    result["gathered"] = distributed.gather_cat(data["values"])
    # A figure weighted by tokens: rank r holds 10 * (r + 1) tokens whose mean is r + 1.
    tokens = 10.0 * (rank + 1)
    result["combined"] = distributed.combine_weighted({"x": (rank + 1) * tokens}, {"x": tokens})
    layer = torch.nn.Linear(3, 1)
    distributed.broadcast_parameters(list(layer.parameters()))
    result["weight"] = layer.weight.detach().clone()
    layer.weight.grad = torch.full_like(layer.weight, float(rank + 1))  # bias: no gradient on any process
    distributed.sum_gradients(list(layer.parameters()))
    result["grad"], result["bias_grad"] = layer.weight.grad.clone(), layer.bias.grad.clone()
    # Reward normalization: the running moments see every process's totals.
    mix = RewardMix([RewardTerm("t", 1.0, lambda rows, texts: [float(len(t)) for t in texts])], normalize=True)
    for _ in range(2):
        mix.moments.update(distributed.gather_cat(data["totals"]))
    result["reward_moments"] = mix.moments.state_dict()
    # The KL and entropy figures of a step, and the adaptive KL coefficient they drive.
    exp = SimpleNamespace(old_logps=data["old_logps"], ref_logps=data["ref_logps"], entropy=data["entropy"],
                          mask=data["mask"])
    figures = PPOTrainer.sampling_figures(None, exp)
    controller = AdaptiveKL(0.05, 0.01, 100)
    controller.update(figures["kl_per_token"], int(distributed.all_sum(torch.tensor(len(data["mask"])))))
    result["sampling_figures"], result["kl_coef"] = figures, controller.coef
    # The length-grouped sampler through accelerate: per-process batches of 2, global batches of 4.
    lengths = [(7 * i) % 11 for i in range(16)]
    accelerator = Accelerator(cpu=True)
    loader = DataLoader(list(range(16)), batch_size=2,
                        sampler=LengthGroupedEpochSampler(lengths, 2 * distributed.world_size(), seed=3))
    result["batches"] = [batch.tolist() for batch in accelerator.prepare(loader)]
    result["ppo_weights"], result["ppo_figures"] = _ppo_update(base, out, slice(4 * rank, 4 * rank + 4))
    result["fsdp"] = _fsdp_passes(base)
    result["stops"] = _stop_decisions(rank)
    result["main_only"] = distributed.on_main(lambda: f"measured on rank {distributed.rank()}")
    try:
        distributed.on_main(lambda: (_ for _ in ()).throw(ValueError("main failed")))
    except ValueError as err:
        result["main_error"] = str(err)
    torch.save(result, out / f"rank{rank}.pt")


# ------------------------------------------------------------------------------------------ statistics


@pytest.fixture(scope="module")
def two_process_stats(tmp_path_factory, tiny_base) -> list[dict]:
    out = tmp_path_factory.mktemp("stats")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__)), "stats", str(out), str(tiny_base)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _concatenated(key: str) -> torch.Tensor:
    return torch.cat([_rank_data(r)[key] for r in range(2)])


def test_the_workers_ran_as_two_gloo_processes(two_process_stats):
    assert [s["world_size"] for s in two_process_stats] == [2, 2]
    assert {s["backend"] for s in two_process_stats} == {"gloo"}


def test_whitening_and_moments_equal_the_single_process_functions_on_all_rows(two_process_stats):
    from align.objectives.stats import explained_variance, masked_mean, masked_var, whiten

    values, mask, returns = _concatenated("values"), _concatenated("mask"), _concatenated("returns")
    expected = whiten(values, mask)
    got = torch.cat([s["whitened"] for s in two_process_stats])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for stats in two_process_stats:  # every process holds the same global figures
        mean, var = stats["moments"]
        assert float(mean) == pytest.approx(float(masked_mean(values, mask)), rel=1e-5)
        assert float(var) == pytest.approx(float(masked_var(values, mask)), rel=1e-5)
        assert stats["explained_variance"] == pytest.approx(explained_variance(values, returns, mask), rel=1e-5)
        torch.testing.assert_close(stats["gathered"], values)


def test_weighted_figures_and_gradients_are_pooled(two_process_stats):
    for stats in two_process_stats:
        # ranks' means 1 (10 tokens) and 2 (20 tokens): token-weighted mean 5/3
        assert stats["combined"]["x"] == pytest.approx(5 / 3)
        torch.testing.assert_close(stats["grad"], torch.full((1, 3), 3.0))  # 1 + 2: summed, not averaged
        torch.testing.assert_close(stats["bias_grad"], torch.zeros(1))
    torch.testing.assert_close(two_process_stats[0]["weight"], two_process_stats[1]["weight"])  # main's start


def test_reward_moments_and_the_kl_controller_stay_in_sync(two_process_stats):
    from align.objectives.kl import AdaptiveKL, kl_per_token
    from align.objectives.stats import masked_mean
    from align.rewards.mix import RunningMoments

    moments = RunningMoments()
    for _ in range(2):
        moments.update(_concatenated("totals"))
    mask = _concatenated("mask")
    kl = float(masked_mean(kl_per_token(_concatenated("old_logps"), _concatenated("ref_logps"), "k1"), mask))
    entropy = float(masked_mean(_concatenated("entropy"), mask))
    controller = AdaptiveKL(0.05, 0.01, 100)
    controller.update(kl, len(mask))
    for stats in two_process_stats:
        saved = stats["reward_moments"]
        assert saved["count"] == moments.count
        assert saved["mean"] == pytest.approx(moments.mean, rel=1e-9)
        assert saved["m2"] == pytest.approx(moments.m2, rel=1e-9)
        assert stats["sampling_figures"]["kl_per_token"] == pytest.approx(kl, rel=1e-5)
        assert stats["sampling_figures"]["entropy"] == pytest.approx(entropy, rel=1e-5)
        assert stats["kl_coef"] == pytest.approx(controller.coef, rel=1e-6)


def test_the_length_grouped_sampler_gives_each_process_its_slice_of_every_global_batch(two_process_stats):
    from align.data.sampling import LengthGroupedEpochSampler

    lengths = [(7 * i) % 11 for i in range(16)]
    single = list(LengthGroupedEpochSampler(lengths, 4, seed=3))  # one process, global batch 4
    rank0, rank1 = (s["batches"] for s in two_process_stats)
    assert len(rank0) == len(rank1) == 4
    for step in range(4):
        assert rank0[step] + rank1[step] == single[4 * step:4 * step + 4]
    assert not set(sum(rank0, [])) & set(sum(rank1, []))


def test_a_ppo_update_on_two_halves_equals_one_update_on_all_rows(two_process_stats, tiny_base, tmp_path):
    """Gradients summed over processes, each loss scaled by the global token count: the same step as one
    process taking every row (one minibatch of 8 rows: 4 per process, micro-batches of 3)."""
    weights, figures = _ppo_update(tiny_base, tmp_path, slice(0, 8))
    for stats in two_process_stats:
        assert stats["ppo_weights"].keys() == weights.keys()
        for name, value in weights.items():
            torch.testing.assert_close(stats["ppo_weights"][name], value, rtol=1e-4, atol=1e-6, msg=name)
        for key in ("policy_loss", "clip_fraction", "grad_norm"):
            assert stats["ppo_figures"][key] == pytest.approx(figures[key], rel=1e-4, abs=1e-7), key
    moved = sum(float((v - _ppo_start(tiny_base)[n]).abs().max()) for n, v in weights.items())
    assert moved > 1e-4  # the step did something


def _ppo_start(base: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_main_only_work_runs_once_and_its_result_or_error_reaches_every_process(two_process_stats):
    for stats in two_process_stats:
        assert stats["main_only"] == "measured on rank 0"
        assert stats["main_error"] == "main failed"


def test_one_process_signalled_or_out_of_time_stops_them_all(two_process_stats):
    for stats in two_process_stats:
        assert stats["stops"] == {"signal": (True, True, True), "time_limit": (True, True, True)}


def test_under_fsdp_our_direct_passes_run_and_main_reloads_the_gathered_weights(two_process_stats):
    for stats in two_process_stats:
        fsdp = stats["fsdp"]
        torch.testing.assert_close(fsdp["sharded"], fsdp["whole"])
        assert fsdp["all_grads"]
    torch.testing.assert_close(two_process_stats[0]["fsdp"]["reloaded"], two_process_stats[0]["fsdp"]["whole"])


# ------------------------------------------------------------------------------------------ stages


def _write_recipe(folder: Path, base: Path) -> Path:
    import yaml

    from tests.conftest import EVAL_ROWS, SFT_ROWS, write_jsonl

    prompts = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(4) for b in range(4)]
    kind, rude = ["Sure, glad to help.", "Happy to help you."], ["No. Go away.", "Leave me alone."]
    pairs = [{"prompt": f"Question {i}: can you help?", "chosen": kind[i % 2], "rejected": rude[i % 2]}
             for i in range(32)]
    write_jsonl(folder / "sft.jsonl", SFT_ROWS)
    write_jsonl(folder / "prefs.jsonl", pairs)
    write_jsonl(folder / "prompts.jsonl", prompts)
    write_jsonl(folder / "eval.jsonl", EVAL_ROWS)
    lora = {"r": 8, "alpha": 16, "dropout": 0.0}
    common = {"max_steps": 3, "logging_steps": 1, "save_steps": 2, "scheduler": "constant", "lora": lora,
              "mixed_precision": "no"}
    recipe = {
        "name": "tiny", "base": str(base),
        "stages": {
            "sft": {"data": "sft.jsonl", "batch_size": 2, "lr": 1e-2, "eval_split": 0.2, **common},
            "reward": {"from": "base", "data": "prefs.jsonl", "batch_size": 4, "lr": 5e-3, "eval_split": 0.25,
                       **common},
            "dpo": {"from": "base", "data": "prefs.jsonl", "batch_size": 4, "lr": 5e-3, "eval_split": 0.25,
                    "beta": 0.5, **common},
            "ppo": {"from": "sft", "prompts": "prompts.jsonl", "rewards": [{"checker": "regex",
                    "args": {"pattern": "[0-9]"}}], "rollout_batch": 8, "minibatch": 4, "batch_size": 4,
                    "ppo_epochs": 1, "lr": 1e-2, "generation": {"max_new_tokens": 6, "temperature": 1.0},
                    "kl": {"coef": 0.01}, "eval_split": 0.2, **{**common, "max_steps": 2}}},
        "eval": {"prompts": "eval.jsonl", "checkers": ["math_answer"], "generation": {"max_new_tokens": 4},
                 "limit": 2, "samples": 1, "batch_size": 4},
    }
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))  # stages run in the order written
    return path


def _losses(entry) -> list[float]:
    return [h["loss"] for h in entry.manifest["history"] if "loss" in h]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_base):
    """The recipe run by `align run --nproc 2` in a subprocess (its own run folder and registry)."""
    folder = tmp_path_factory.mktemp("two")
    recipe = _write_recipe(folder, tiny_base)
    command = [sys.executable, "-m", "align.cli.main", "--registry", "registry", "run", recipe.name, "--nproc", "2"]
    done = subprocess.run(command, cwd=folder, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return folder, done


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_base):
    """SFT, reward and DPO in this process with each per-process batch doubled: the same global batch."""
    from align.pipeline.run import run_recipe
    from align.config.loading import load_recipe
    from align.registry.store import Registry

    folder = tmp_path_factory.mktemp("one")
    recipe = load_recipe(_write_recipe(folder, tiny_base), ["stages.sft.batch_size=4", "stages.reward.batch_size=8",
                                                            "stages.dpo.batch_size=8"])
    return run_recipe(recipe, Registry(folder / "registry"), ["sft", "reward", "dpo"], runs_root=folder / "runs")


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_two_processes_log_the_losses_of_one_with_the_same_global_batch(stage, two_process_run, one_process_run):
    from align.registry.store import Registry

    folder, _ = two_process_run
    two = _losses(Registry(folder / "registry").resolve(f"tiny/{stage}"))
    one = _losses(one_process_run[stage])
    assert len(two) == len(one) == 3
    assert two == pytest.approx(one, rel=TOLERANCE), (
        f"{stage}: 2 processes {two} vs 1 process {one} (a loss divided by the token count of all processes "
        "must be multiplied by their number, as transformers' Trainer.compute_loss does: DDP averages gradients)")


def test_each_stage_registers_one_entry_and_ppo_completes_its_steps(two_process_run):
    from align.registry.store import Registry

    folder, done = two_process_run
    entries = Registry(folder / "registry").list()
    assert sorted(e.ref for e in entries) == ["tiny/dpo@1", "tiny/ppo@1", "tiny/reward@1", "tiny/sft@1"]
    assert not (folder / "registry" / ".staging").exists() or not any((folder / "registry" / ".staging").iterdir())
    ppo = Registry(folder / "registry").resolve("tiny/ppo")
    steps = [h for h in ppo.manifest["history"] if "reward" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for figures in steps:  # every step's figures were pooled over both processes' 4 + 4 responses
        assert 0.0 <= figures["reward"] <= 1.0 and figures["kl_coef"] > 0
        assert figures["trained_share"] == 1.0
    assert "heldout_reward" in ppo.manifest["metrics"]
    assert ppo.manifest["parent"]["ref"] == "tiny/sft@1"  # every process received the entry SFT registered
    assert done.stdout.count("tiny/ppo@1") == 1  # one process reports


def test_the_run_records_two_processes_and_one_process_refuses_to_resume_it(two_process_run):
    from align.errors import TrainingError
    from align.stages.run_folder import prepare_run_dir

    folder, _ = two_process_run
    run_dir = folder / "runs" / "tiny" / "sft"
    fingerprint = json.loads((run_dir / "run.json").read_text())
    assert fingerprint["world_size"] == 2
    assert json.loads((run_dir / "checkpoint-3" / "world.json").read_text()) == {"world_size": 2}
    assert json.loads((folder / "runs" / "tiny" / "ppo" / "checkpoint-2" / "world.json").read_text()) == \
        {"world_size": 2}
    with pytest.raises(TrainingError, match="started with 2 process"):
        prepare_run_dir(run_dir, {k: v for k, v in fingerprint.items() if k != "world_size"}, force=False)


def test_ppo_batches_that_do_not_split_among_the_processes_are_refused(tmp_path, tiny_base, monkeypatch):
    from align.errors import TrainingError
    from align.config.loading import validate_recipe
    from align.stages.ppo import per_process_config

    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n")

    def config(**stage):
        raw = {"name": "t", "base": str(tiny_base),
               "stages": {"ppo": {"prompts": str(tmp_path / "p.jsonl"), **PPO_STAGE, **stage}}}
        return validate_recipe(raw, []).stages["ppo"]

    assert per_process_config(config(), "ppo") is not None  # one process: unchanged
    monkeypatch.setenv("WORLD_SIZE", "2")
    halved = per_process_config(config(), "ppo")
    assert (halved.rollout_batch, halved.minibatch) == (4, 4)
    with pytest.raises(TrainingError, match="rollout_batch / samples_per_prompt = 3 prompts per step .* among 2"):
        per_process_config(config(rollout_batch=6, minibatch=6), "ppo")
    with pytest.raises(TrainingError, match="minibatch 5 must divide evenly among 2 processes"):
        per_process_config(config(minibatch=5, estimator="gae", samples_per_prompt=1), "ppo")


def test_align_run_refuses_ppo_batches_that_do_not_split_before_launching(tmp_path, tiny_base, capsys):
    from align.cli.main import main

    recipe = _write_recipe(tmp_path, tiny_base)
    assert main(["--registry", str(tmp_path / "registry"), "run", str(recipe), "--nproc", "3"]) == 2
    assert "stages.ppo: rollout_batch / samples_per_prompt = 8 prompts per step" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ launcher


def test_the_launcher_becomes_accelerate_launch_without_our_flags():
    from align.pipeline.launch import launch_command

    argv = ["--registry", "reg", "run", "r.yaml", "--nproc", "4", "--engine=fsdp", "--stage", "sft",
            "--num-machines", "2", "--machine-rank", "1", "--main-process-ip", "10.0.0.1", "--main-process-port",
            "29500"]
    machines = {"--num-machines": 2, "--machine-rank": 1, "--main-process-ip": "10.0.0.1",
                "--main-process-port": 29500}
    command = launch_command(argv, 4, "fsdp", machines)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--config_file") + 1].endswith("recipes/accelerate/fsdp.yaml")
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[command.index("--main_process_ip") + 1] == "10.0.0.1"
    assert command[command.index("--machine_rank") + 1] == "1"
    assert command[command.index("-m", 3):] == ["-m", "align.cli.main", "--registry", "reg", "run", "r.yaml",
                                                "--stage", "sft"]


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is not None, reason="deepspeed installed")
def test_a_deepspeed_engine_without_deepspeed_is_refused_before_anything_starts(tmp_path, tiny_base, capsys):
    from align.cli.main import main

    recipe = _write_recipe(tmp_path, tiny_base)
    assert main(["--registry", str(tmp_path / "registry"), "run", str(recipe), "--nproc", "2",
                 "--engine", "zero3"]) == 2
    err = capsys.readouterr().err
    assert "--engine zero3: needs DeepSpeed" in err and "pip install" in err
    assert not (tmp_path / "registry").exists() and not (tmp_path / "runs").exists()


def test_an_unknown_engine_is_named(tmp_path, tiny_base, capsys):
    from align.cli.main import main

    recipe = _write_recipe(tmp_path, tiny_base)
    assert main(["run", str(recipe), "--nproc", "2", "--engine", "tpu-pod"]) == 2
    assert "--engine tpu-pod: expected one of ddp, fsdp, zero2, zero3" in capsys.readouterr().err


if __name__ == "__main__":  # the worker, under torchrun
    if sys.argv[1] == "stats":
        _stats_worker(Path(sys.argv[2]), Path(sys.argv[3]))
