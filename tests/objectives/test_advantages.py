"""Advantage estimators against hand-computed values; their properties; and a new estimator is one
registered function: the recipe accepts its name and the PPO trainer computes advantages with it."""

from __future__ import annotations

import pytest
import torch

from align.errors import ConfigError
from align.config.loading import validate_recipe
from align.objectives.advantages import (ADVANTAGE_ESTIMATORS, AdvantageBatch, AdvantageSettings, advantage_estimator,
                                         gae, group_advantages, last_positions, leave_one_out_advantages,
                                         register_advantage_estimator, reward_to_go)


def test_gae_by_hand_and_padding_changes_nothing():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=2: 1 - 0.4 = 0.6; t=1: (0 + 0.4 - 0.2) + 0.5 * 0.6 = 0.5; t=0: (0 + 0.2 - 0.5) + 0.5 * 0.5 = -0.05
    assert advantages.tolist()[0] == pytest.approx([-0.05, 0.5, 0.6, 0.0], abs=1e-6)
    assert returns.tolist()[0] == pytest.approx([0.45, 0.7, 1.0, 0.0], abs=1e-6)
    discounted, _ = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    assert discounted.tolist()[0] == pytest.approx([0.9, 1.0], abs=1e-6)


def test_group_and_leave_one_out_advantages():
    grouped = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    assert grouped.tolist() == pytest.approx([1, -1, -1, 1, 0, 0, 0, 0], abs=1e-4)  # a solved group teaches nothing
    unscaled = group_advantages(torch.tensor([3.0, 1.0]), group_size=2, scale=False)
    assert unscaled.tolist() == pytest.approx([1.0, -1.0])
    loo = leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3)
    assert loo.tolist() == pytest.approx([1.0, -0.5, -0.5])
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(torch.tensor([1.0]), group_size=1)


def test_the_registered_estimators_shape_the_reward_with_the_kl_penalty():
    """gae: -coef * KL per token, the score at the last response token; grpo/rloo: the score less coef * the
    summed KL, one advantage per response spread over its tokens."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    batch = AdvantageBatch(scores=torch.tensor([1.0, 0.0]), kl=torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]]),
                           kl_coef=0.5, mask=mask, values=torch.zeros(2, 3))
    assert last_positions(mask).tolist() == [1, 2]
    assert batch.token_rewards().tolist() == [[-0.5, 0.5, 0.0], [0.0, -1.0, 0.0]]
    settings = AdvantageSettings(estimator="gae", gamma=1.0, lam=1.0, group_size=2, group_scale=False, whiten=False)
    advantages, returns = advantage_estimator("gae")(batch, settings)
    assert advantages.tolist() == [[0.0, 0.5, 0.0], [-1.0, -1.0, 0.0]]  # reward-to-go, critic at 0
    assert torch.equal(returns, advantages)
    rloo, no_returns = advantage_estimator("rloo")(batch, settings)  # sequence rewards 0 and -1
    assert rloo.tolist() == [[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]] and no_returns is None
    grpo, _ = advantage_estimator("grpo")(batch, settings)
    assert grpo.tolist() == [[0.5, 0.5, 0.0], [-0.5, -0.5, -0.5]]


def test_reinforce_pp_normalises_the_per_token_returns_over_the_batch():
    """Token rewards (score at the last token, -0.5 * KL at each): [-0.5, 0.5 | pad] and [0, -1, 0]. Returns
    to go (gamma 1): [0, 0.5] and [-1, -1, 0]; over the 5 tokens mean -0.3, variance
    (0.09 + 0.64 + 0.49 + 0.49 + 0.09) / 5 = 0.36, std 0.6."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    batch = AdvantageBatch(scores=torch.tensor([1.0, 0.0]), kl=torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]]),
                           kl_coef=0.5, mask=mask)
    settings = AdvantageSettings(estimator="reinforce_pp", gamma=1.0, lam=0.95, group_size=1, group_scale=False,
                                 whiten=False)
    advantages, returns = advantage_estimator("reinforce_pp")(batch, settings)
    expected = [[(0 + 0.3) / 0.6, (0.5 + 0.3) / 0.6, 0.0], [(-1 + 0.3) / 0.6, (-1 + 0.3) / 0.6, (0 + 0.3) / 0.6]]
    torch.testing.assert_close(advantages, torch.tensor(expected), atol=1e-5, rtol=0)
    assert returns is None  # no critic to train
    discounted = reward_to_go(torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3), gamma=0.5)
    assert discounted.tolist()[0] == pytest.approx([0.25, 0.5, 1.0])


def test_each_estimator_says_what_it_needs():
    needs = {name: (e.needs_critic, e.needs_groups) for name, e in ADVANTAGE_ESTIMATORS.items()}
    assert needs == {"gae": (True, False), "grpo": (False, True), "rloo": (False, True),
                     "reinforce_pp": (False, False)}
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; expected one of 'gae', 'grpo', 'rloo' "
                                         "or 'reinforce_pp'"):
        advantage_estimator("ppo")


# ------------------------------------------------------------------------------------------ a new estimator


def _ppo_stage(**stage):
    raw = {"name": "t", "base": "tiny/base",
           "stages": {"ppo": {"prompts": "prompts.jsonl", "rewards": [{"checker": "regex"}], **stage}}}
    return validate_recipe(raw, []).stages["ppo"]


@pytest.fixture
def batch_baseline():
    """An estimator the package does not have (REINFORCE with the batch's mean reward as baseline),
    registered for the test only."""

    @register_advantage_estimator("batch_baseline")
    def batch_baseline(batch, settings):
        rewards = batch.sequence_rewards()
        return (rewards - rewards.mean())[:, None] * batch.mask, None

    yield "batch_baseline"
    ADVANTAGE_ESTIMATORS.remove("batch_baseline")


def test_a_new_estimator_is_accepted_by_the_recipe_and_used_by_the_ppo_trainer(batch_baseline):
    from align.rl.ppo import PPOTrainer
    from align.rl.settings import PPOSettings

    cfg = _ppo_stage(estimator=batch_baseline, whiten_advantages=False, kl={"coef": 0.5, "penalty": "reward"})
    model = torch.nn.Linear(2, 2)
    trainer = PPOTrainer(PPOSettings.from_stage(cfg), model, None, None, reference=model)
    assert trainer.settings.estimator.name == "batch_baseline" and not trainer.settings.estimator.needs_critic
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    ref_logps = torch.zeros(3, 3)
    old_logps = torch.tensor([[0.2, 0.2, 9.0], [0.0, 9.0, 9.0], [0.0, 0.0, 0.0]])  # k1 sums 0.4, 0, 0 (padding: 0)
    advantages, returns = trainer.advantages(torch.tensor([1.0, 0.0, 0.5]), old_logps, ref_logps, None, mask)
    sequence = [1.0 - 0.5 * 0.4, 0.0, 0.5]  # the score less coef * the summed KL
    expected = [s - sum(sequence) / 3 for s in sequence]
    torch.testing.assert_close(advantages, torch.tensor(expected)[:, None] * mask)
    assert returns is None


def test_a_new_estimators_properties_choose_the_trainers_passes(batch_baseline):
    """No critic: with the KL in the loss and one update per rollout the trainer takes the sampling-time
    log-probs from the update's own pass (on-policy); not grouped: no prompt is skipped for uniform rewards."""
    from align.rl.ppo import PPOTrainer
    from align.rl.settings import PPOSettings

    cfg = _ppo_stage(estimator=batch_baseline, kl={"coef": 0.1, "penalty": "loss"}, ppo_epochs=1, minibatch=16)
    model = torch.nn.Linear(2, 2)
    trainer = PPOTrainer(PPOSettings.from_stage(cfg), model, None, None, reference=model)
    assert trainer.on_policy and not trainer.skip_uniform
    gae_trainer = PPOTrainer(PPOSettings.from_stage(_ppo_stage(kl={"coef": 0.1, "penalty": "loss"}, ppo_epochs=1,
                                                               minibatch=16)), model, None, None, reference=model)
    assert not gae_trainer.on_policy  # the critic needs its values from a scoring pass


def test_an_unregistered_estimator_is_refused_at_its_yaml_path_with_the_known_names():
    with pytest.raises(ConfigError) as err:
        _ppo_stage(estimator="batch_baseline")
    assert [str(p) for p in err.value.problems] == [
        "stages.ppo.estimator: expected one of 'gae', 'grpo', 'rloo' or 'reinforce_pp', got \"batch_baseline\""]


def test_a_grouped_estimator_still_needs_several_samples_per_prompt():
    with pytest.raises(ConfigError, match="estimator rloo compares the samples of a prompt: set samples_per_prompt"):
        _ppo_stage(estimator="rloo")
    assert _ppo_stage(estimator="rloo", samples_per_prompt=2).estimator == "rloo"
