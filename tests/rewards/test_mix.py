"""The reward mix: a weighted sum of sources, each kept apart for logging; running normalization agrees with
the statistics of everything seen; clipping bounds the total; repeated sources get distinct names."""

from __future__ import annotations

import pytest
import torch

from align.config.schema import RewardSource
from align.rewards.mix import RewardMix, RewardTerm, RunningMoments, checker_term, term_names

ROWS = [{"answer": "4"}, {"answer": "5"}, {"answer": "6"}]
TEXTS = ["2 + 2 = 4\n#### 4", "It is 7.", "#### 6"]


def test_weighted_sum_of_checkers_with_each_source_kept():
    mix = RewardMix([checker_term("math_answer", 1.0, {}), checker_term("answer_format", 0.5, {})])
    total, per_source = mix(ROWS, TEXTS)
    assert per_source["math_answer"].tolist() == [1.0, 0.0, 1.0]
    assert per_source["answer_format"].tolist() == [1.0, 0.0, 1.0]
    assert total.tolist() == pytest.approx([1.5, 0.0, 1.5])


def test_running_moments_match_the_statistics_of_all_values():
    moments, seen = RunningMoments(), []
    for chunk in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0]), torch.tensor([-4.0, 0.5])):
        moments.update(chunk)
        seen.append(chunk)
    everything = torch.cat(seen).double()
    assert moments.mean == pytest.approx(float(everything.mean()))
    assert moments.std == pytest.approx(float(everything.std(unbiased=False)))


def test_normalization_and_clipping():
    constant = RewardTerm(name="k", weight=1.0, score=lambda rows, texts: [0.0, 10.0, 20.0])
    normalized, _ = RewardMix([constant], normalize=True)(ROWS, TEXTS)
    assert float(normalized.mean()) == pytest.approx(0.0, abs=1e-6) and float(normalized.std(unbiased=False)) == pytest.approx(1.0)
    clipped, raw = RewardMix([constant], clip=5.0)(ROWS, TEXTS)
    assert clipped.tolist() == [0.0, 5.0, 5.0] and raw["k"].tolist() == [0.0, 10.0, 20.0]


def test_repeated_sources_get_numbered_names():
    sources = [RewardSource(checker="regex", args={"pattern": "a"}), RewardSource(checker="regex", args={"pattern": "b"}),
               RewardSource(model="quickstart/reward")]
    assert term_names(sources) == ["regex", "regex#2", "reward:quickstart/reward"]
