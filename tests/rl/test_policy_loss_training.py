"""The new PPO options train a tiny random Llama on the digit checker (`tests/stages/test_ppo.py`'s setup): GSPO's
sequence-level loss (two epochs, so its ratios move off 1, averaged per sequence) and the critic-free REINFORCE++
estimator each raise the reward from the first steps to the last."""

from __future__ import annotations

from tests.stages.test_ppo import _mean, _train


def test_gspo_learns_the_checkers_reward(tmp_path, tiny_base):
    stage = {"estimator": "grpo", "policy_loss": "gspo", "loss_aggregation": "sequence_mean", "samples_per_prompt": 4,
             "kl": {"coef": 0.01, "penalty": "loss"}, "ppo_epochs": 2, "minibatch": 8, "max_steps": 24}
    _, _, entry = _train(tmp_path, tiny_base, stage)
    history = entry.manifest["history"]
    # it learns from the second step on: the first two against the last six (untrained, lr ~0: +0.1)
    assert _mean(history, "reward", slice(-6, None)) > _mean(history, "reward", slice(0, 2)) + 0.25
    trained = [h for h in history if "approx_kl" in h]
    assert any(h["approx_kl"] > 0 for h in trained)  # the second epoch's ratios were not all 1


def test_reinforce_pp_learns_the_checkers_reward(tmp_path, tiny_base):
    stage = {"estimator": "reinforce_pp", "kl": {"coef": 0.01, "penalty": "reward"}, "max_steps": 24}
    _, _, entry = _train(tmp_path, tiny_base, stage)
    history = entry.manifest["history"]
    assert "value_loss" not in history[0] and not (entry.path / "value_head.pt").exists()
    # the first four steps against the last six (untrained, lr ~0: +0.16)
    assert _mean(history, "reward", slice(-6, None)) > _mean(history, "reward", slice(0, 4)) + 0.25
