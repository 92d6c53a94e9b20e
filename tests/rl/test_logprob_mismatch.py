"""The sampler-vs-policy log-prob mismatch: computed over response tokens only, logged at every PPO step (about
zero when the sampler is the policy in fp32), and `max_logprob_mismatch` stops a run whose sampler is not the
policy it trains, naming the step, the figure and the key, with nothing registered."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from align.config.loading import validate_recipe
from align.errors import TrainingError
from align.pipeline.run import run_recipe
from align.registry.store import Registry
from align.rl.experience import Experience
from align.rl.logprob_mismatch import mismatch_figures, stop_if_mismatched
from align.rl.rollout import Rollouts, pack
from tests.conftest import write_jsonl

PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(4) for b in range(4)]
TINY_PPO = {"from": "base", "rewards": [{"checker": "regex", "args": {"pattern": "[0-9]"}}], "rollout_batch": 8,
            "minibatch": 4, "batch_size": 4, "ppo_epochs": 1, "max_steps": 2, "lr": 1e-2, "scheduler": "constant",
            "generation": {"max_new_tokens": 6, "temperature": 1.0}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "save_steps": 1, "eval_split": 0.0, "mixed_precision": "no"}
# GRPO with one update per rollout and the KL in the loss: on-policy, the policy's log-probs come from the update
# (every row trained on, so that every step has figures whatever the rewards).
ON_POLICY = {"estimator": "grpo", "samples_per_prompt": 2, "minibatch": 8, "kl": {"coef": 0.01, "penalty": "loss"},
             "skip_uniform_groups": False}


def _experience(sampler: torch.Tensor, policy: torch.Tensor) -> Experience:
    ids, attention, labels = pack([[5, 6, 7], [5, 6]], [[8, 9], [10, 11, 12]], pad_id=0)
    rollouts = Rollouts(rows=[{}, {}], texts=["", ""], input_ids=ids, attention_mask=attention, labels=labels,
                        ended=torch.ones(2, dtype=torch.bool), sampler_logps=sampler)
    zeros = torch.zeros(2)
    return Experience(rollouts=rollouts, mask=rollouts.mask.float(), old_logps=policy, ref_logps=policy,
                      entropy=None, values=None, scores=zeros, per_source={}, advantages=torch.zeros_like(policy),
                      returns=None, sampled=rollouts, sampled_scores=zeros)


def test_the_figures_cover_response_tokens_only():
    nan = math.nan
    # Row 0: prompt of 3, response at positions 2 and 3; row 1: prompt of 2, response at positions 1, 2 and 3.
    policy = torch.tensor([[0.0, 0.0, -1.0, -2.0], [0.0, -1.0, -1.0, -1.0]])
    sampler = torch.tensor([[9.0, 9.0, -1.5, -2.0], [9.0, -1.0, -0.8, nan]])  # 9: outside responses; nan: kept none
    figures = mismatch_figures(_experience(sampler, policy))
    assert figures["logprob_mismatch_max"] == pytest.approx(0.5)
    assert figures["logprob_mismatch_mean"] == pytest.approx((0.5 + 0.0 + 0.0 + 0.2) / 4)


def test_no_figures_without_the_samplers_log_probs():
    policy = torch.zeros(2, 4)
    assert mismatch_figures(_experience(None, policy)) == {}


def test_the_limit_names_the_step_the_figure_and_the_key():
    figures = {"logprob_mismatch_mean": 0.2, "logprob_mismatch_max": 1.5}
    stop_if_mismatched(figures, None, 0)  # no limit: logged only
    stop_if_mismatched(figures, 2.0, 0)
    with pytest.raises(TrainingError, match=r"PPO step 4: logprob_mismatch_max is 1\.5 nats .*max_logprob_mismatch 1\b"):
        stop_if_mismatched(figures, 1.0, 3)


def test_a_limit_that_cannot_be_checked_is_said(caplog):
    from align.config.schema import GenerationSettings
    from align.rl.logprob_mismatch import warn_if_unmeasured

    penalized = GenerationSettings(temperature=1.0, repetition_penalty=1.2)
    warn_if_unmeasured(penalized, None)
    warn_if_unmeasured(GenerationSettings(temperature=1.0), 0.5)
    assert caplog.records == []
    warn_if_unmeasured(penalized, 0.5)
    assert "generation.repetition_penalty" in caplog.text and "not measured" in caplog.text


def _train(folder: Path, base, stage: dict):
    prompts = write_jsonl(folder / "prompts.jsonl", PROMPTS)
    raw = {"name": "tiny", "base": str(base), "stages": {"ppo": {"prompts": str(prompts), **TINY_PPO, **stage}}}
    recipe = validate_recipe(raw, [], source=str(folder / "r.yaml"))
    return run_recipe(recipe, Registry(folder / "registry"), runs_root=folder / "runs")["ppo"]


@pytest.mark.parametrize("stage", [{}, ON_POLICY], ids=["gae", "on-policy-grpo"])
def test_in_fp32_the_sampler_is_the_policy_at_every_step(tmp_path, tiny_base, stage):
    entry = _train(tmp_path, tiny_base, stage)
    history = entry.manifest["history"]
    assert len(history) == 2
    for figures in history:
        assert 0.0 <= figures["logprob_mismatch_mean"] <= figures["logprob_mismatch_max"] < 1e-3


def test_a_sampler_that_is_not_the_policy_stops_the_run(tmp_path, tiny_base, monkeypatch):
    """The sampling copy's adapted weights perturbed after every sync: the rollouts come from another model."""
    from align.rl.sampling_copy import SamplingCopy

    real_sync = SamplingCopy.sync

    def perturbed(self):
        model = real_sync(self)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name in self.targets:  # the copy's own tensors: the policy's weights stay as they are
                weight = model.get_submodule(name).weight
                weight.add_(torch.randn(weight.shape, generator=generator) * 0.5)
        return model

    monkeypatch.setattr(SamplingCopy, "sync", perturbed)
    with pytest.raises(TrainingError, match=r"PPO step 1: logprob_mismatch_max is [0-9.]+ nats .*"
                                            r"over max_logprob_mismatch 0\.5\b"):
        _train(tmp_path, tiny_base, {"max_logprob_mismatch": 0.5})
    assert Registry(tmp_path / "registry").find("tiny/ppo") is None
    from align.stages.run_folder import latest_checkpoint

    assert latest_checkpoint(tmp_path / "runs" / "tiny" / "ppo") is None  # step 1's checkpoint never written
