"""Pieces of the PPO loop that are pure functions of their inputs."""

import torch

from align.rl.experience import informative_rows


def test_informative_rows_keep_whole_groups_whose_rewards_differ():
    scores = torch.tensor([1.0, 1.0, 1.0,   0.0, 1.0, 0.0,   0.0, 0.0, 0.0,   0.5, 0.5, 0.2])
    assert informative_rows(scores, 3) == [3, 4, 5, 9, 10, 11]


def test_no_group_is_informative_when_every_reward_is_equal():
    assert informative_rows(torch.zeros(8), 4) == []
    assert informative_rows(torch.tensor([0.0, 1.0]), 1) == []  # one sample per prompt: nothing to compare
