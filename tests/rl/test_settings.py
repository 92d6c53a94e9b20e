"""`PPOSettings`: the PPO trainer's settings, built from a PPO stage's config."""

from __future__ import annotations

import dataclasses

import pytest

from align.config.loading import validate_recipe
from align.rl.settings import PPOSettings


def _stage(**stage):
    raw = {"name": "t", "base": "tiny/base",
           "stages": {"ppo": {"prompts": "prompts.jsonl", "rewards": [{"checker": "regex"}], **stage}}}
    return validate_recipe(raw, []).stages["ppo"]


def test_the_settings_carry_the_stage_values_grouped_by_objective():
    cfg = _stage(estimator="grpo", samples_per_prompt=4, rollout_batch=8, minibatch=8, gamma=0.9, lam=0.8,
                 group_scale=False, whiten_advantages=False, kl={"coef": 0.02, "penalty": "loss", "adaptive": True,
                                                                 "target": 0.3, "horizon": 100},
                 clip=0.3, value_clip=0.4, vf_coef=0.5, lr=1e-3, seed=7, generation={"temperature": 0.7})
    settings = PPOSettings.from_stage(cfg)
    assert dataclasses.astuple(settings.advantage) == ("grpo", 0.9, 0.8, 4, False, False)
    assert (settings.kl.coef, settings.kl.placement, settings.kl.estimator, settings.kl.controller,
            settings.kl.target, settings.kl.horizon) == (0.02, "loss", "k3", "adaptive", 0.3, 100)
    assert (settings.rollout_batch, settings.minibatch, settings.clip, settings.value_clip, settings.vf_coef,
            settings.lr, settings.seed) == (8, 8, 0.3, 0.4, 0.5, 1e-3, 7)
    assert settings.generation.temperature == 0.7
    assert settings.estimator.name == "grpo" and settings.estimator.needs_groups


def test_the_settings_are_frozen():
    settings = PPOSettings.from_stage(_stage())
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 1.0


def test_under_several_processes_the_settings_hold_this_process_share(monkeypatch):
    from align.stages.ppo import per_process_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    settings = PPOSettings.from_stage(per_process_config(_stage(rollout_batch=16, minibatch=8), "ppo"))
    assert (settings.rollout_batch, settings.minibatch) == (8, 4)


def test_the_mismatch_limit_is_carried_and_left_out_of_the_dump_while_unset():
    """The stage dump is hashed into run fingerprints: a config without the key hashes as before it existed."""
    unset, limited = _stage(), _stage(max_logprob_mismatch=0.5)
    assert PPOSettings.from_stage(unset).max_logprob_mismatch is None
    assert PPOSettings.from_stage(limited).max_logprob_mismatch == 0.5
    assert "max_logprob_mismatch" not in unset.model_dump(by_alias=True)
    assert limited.model_dump(by_alias=True)["max_logprob_mismatch"] == 0.5
