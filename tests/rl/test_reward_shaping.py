"""Length shaping of a step's rewards: DAPO's soft overlong punishment by hand, combined with the missing-EOS
penalty, and its recipe key (left out of the hashed dump while unset, refused when its buffer is too long)."""

from __future__ import annotations

import types

import pytest
import torch

from align.config.loading import validate_recipe
from align.errors import ConfigError
from align.rl.reward_shaping import overlong_penalty, shaped_scores
from align.rl.settings import PPOSettings


def _stage(**stage):
    raw = {"name": "t", "base": "tiny/base",
           "stages": {"ppo": {"prompts": "prompts.jsonl", "rewards": [{"checker": "regex"}], **stage}}}
    return validate_recipe(raw, []).stages["ppo"]


def test_overlong_penalty_by_hand():
    """max_new_tokens 8, buffer 4: nothing up to 4 tokens, then (length - 4) / 4 of the penalty 0.5."""
    penalty = overlong_penalty(torch.tensor([3, 4, 6, 8]), max_new_tokens=8, buffer=4, penalty=0.5)
    assert penalty.tolist() == [0.0, 0.0, 0.25, 0.5]


def test_the_shaped_scores_subtract_both_length_penalties():
    settings = PPOSettings.from_stage(_stage(missing_eos_penalty=0.2, overlong={"buffer": 4, "penalty": 0.5},
                                             generation={"max_new_tokens": 8}))
    # response lengths 2 and 8 (the second cut at max_new_tokens: no EOS)
    rollouts = types.SimpleNamespace(response_lengths=torch.tensor([2, 8]), ended=torch.tensor([True, False]))
    shaped = shaped_scores(torch.tensor([1.0, 1.0]), rollouts, settings)
    torch.testing.assert_close(shaped, torch.tensor([1.0, 1.0 - 0.2 - 0.5]))
    unshaped = PPOSettings.from_stage(_stage())
    assert torch.equal(shaped_scores(torch.tensor([1.0, 1.0]), rollouts, unshaped), torch.tensor([1.0, 1.0]))


def test_the_overlong_key_is_left_out_of_the_dump_while_unset_and_its_buffer_is_checked():
    assert "overlong" not in _stage().model_dump(by_alias=True)
    assert _stage(overlong={"buffer": 16}).model_dump(by_alias=True)["overlong"] == {"buffer": 16, "penalty": 1.0}
    with pytest.raises(ConfigError, match=r"overlong.buffer \(100\) must be at most generation.max_new_tokens \(64\)"):
        _stage(overlong={"buffer": 100})
    with pytest.raises(ConfigError, match="stages.ppo.overlong.length"):
        _stage(overlong={"buffer": 4, "length": 3})


def test_the_ppo_loop_subtracts_the_overlong_penalty_from_the_logged_reward(tmp_path, tiny_base):
    """Same seed, same samples: with buffer = max_new_tokens (8) and penalty 1 every response loses length / 8."""
    from tests.stages.test_ppo import _train

    first = {"max_steps": 1, "save_steps": 1, "logging_steps": 1}
    plain = _train(tmp_path / "plain", tiny_base, first)[2].manifest["history"][0]
    shaped = _train(tmp_path / "shaped", tiny_base, {**first, "overlong": {"buffer": 8, "penalty": 1.0}})[2]
    shaped = shaped.manifest["history"][0]
    assert shaped["response_length"] == plain["response_length"]
    assert shaped["reward"] == pytest.approx(plain["reward"] - plain["response_length"] / 8, abs=1e-5)
