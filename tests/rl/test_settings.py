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


def test_the_policy_loss_keys_are_carried_with_the_clip_bounds_defaulting_to_clip():
    plain = PPOSettings.from_stage(_stage(clip=0.3))
    assert dataclasses.astuple(plain.policy) == ("ppo", 0.3, 0.3, "token_mean", 64)
    chosen = PPOSettings.from_stage(_stage(policy_loss="gspo", samples_per_prompt=2, rollout_batch=8, minibatch=8,
                                           loss_aggregation="constant", clip_low=0.1, clip_high=0.28,
                                           generation={"max_new_tokens": 32}))
    assert dataclasses.astuple(chosen.policy) == ("gspo", 0.1, 0.28, "constant", 32)
    assert chosen.policy_loss.sequence_level and chosen.loss_aggregation.per_row


def test_the_new_policy_loss_keys_are_left_out_of_the_dump_at_their_defaults():
    """The stage dump is hashed into run fingerprints: without the keys it is the dump of before they existed."""
    keys = {"policy_loss", "loss_aggregation", "clip_low", "clip_high"}
    assert not keys & set(_stage().model_dump(by_alias=True))
    dump = _stage(policy_loss="cispo", loss_aggregation="sequence_mean", clip_low=0.2, clip_high=5.0).model_dump(
        by_alias=True)
    assert {key: dump[key] for key in keys} == {"policy_loss": "cispo", "loss_aggregation": "sequence_mean",
                                                "clip_low": 0.2, "clip_high": 5.0}


def test_the_plan_refuses_gspo_with_one_sample_and_non_positive_clip_bounds():
    from align.errors import ConfigError

    with pytest.raises(ConfigError, match="policy_loss gspo is made for several samples of a prompt: set "
                                          "samples_per_prompt >= 2"):
        _stage(policy_loss="gspo")
    with pytest.raises(ConfigError) as err:
        _stage(clip_low=0.0, clip_high=-1.0)
    assert "clip_low must be > 0, got 0.0" in str(err.value) and "clip_high must be > 0, got -1.0" in str(err.value)
    with pytest.raises(ConfigError) as err:
        _stage(policy_loss="dapo")
    assert [str(p) for p in err.value.problems] == [
        "stages.ppo.policy_loss: expected one of 'ppo', 'gspo' or 'cispo', got \"dapo\""]
