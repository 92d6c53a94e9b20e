"""The scoring API: scores read at each row's last real token (padding cannot change them), the gate's
pair metrics, and the refusal of models that are not reward models."""

from __future__ import annotations

import pytest
import torch

from align.models.loading import ModelSource, load_sequence_classifier
from align.rewards.scoring import pair_metrics, reward_problem, score_conversations, score_sequences


@pytest.fixture(autouse=True)
def exact_fp32(monkeypatch):
    """These tests compare scores to 1e-5, which bf16 autocast (on by default where the CPU has it) cannot."""
    monkeypatch.setenv("ALIGN_BF16_INFERENCE", "0")


@pytest.fixture(scope="module")
def classifier(tiny_base, tmp_path_factory):
    from align.registry.store import Registry

    torch.manual_seed(0)
    source = ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base))
    return load_sequence_classifier(source, Registry(tmp_path_factory.mktemp("reg")), dtype="fp32", pad_token_id=2)


def test_a_score_does_not_depend_on_the_padding_around_it(classifier):
    short, long = [5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]
    alone = score_sequences(classifier, [short], pad_id=2)[0]
    in_batch = score_sequences(classifier, [long, short, long], pad_id=2, batch_size=3)
    assert in_batch[1] == pytest.approx(alone, abs=1e-5)
    assert in_batch[0] == pytest.approx(in_batch[2], abs=1e-5)
    assert in_batch[0] != pytest.approx(alone, abs=1e-3)  # the sequences really score differently


def test_scores_are_read_at_the_end_of_each_conversation(classifier, chatml_tokenizer):
    prompt = [{"role": "user", "content": "hello there"}]
    a = prompt + [{"role": "assistant", "content": "hi"}]
    b = prompt + [{"role": "assistant", "content": "hi, nice to meet you, how are you today"}]
    batched = score_conversations(classifier, chatml_tokenizer, [a, b], batch_size=2)
    single = [score_conversations(classifier, chatml_tokenizer, [c])[0] for c in (a, b)]
    assert batched == pytest.approx(single, abs=1e-5)


def test_pair_metrics_by_hand():
    metrics = pair_metrics([2.0, 0.0, 1.0, 3.0], [1.0, 1.0, 1.0, 0.0])
    assert metrics["pairwise_accuracy"] == pytest.approx(2.5 / 4)  # right, wrong, tie, right
    assert metrics["tie_share"] == pytest.approx(0.25)
    assert metrics["gap_mean"] == pytest.approx((1 - 1 + 0 + 3) / 4)
    assert metrics["chosen_mean"] == pytest.approx(1.5) and metrics["rejected_mean"] == pytest.approx(0.75)
    assert metrics["score_mean"] == pytest.approx(1.125)
    assert metrics["pairs"] == 4


def test_a_language_model_folder_is_not_a_reward_model(tiny_base):
    why = reward_problem(ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base)))
    assert why is not None and "not a sequence-classification model" in why and "LlamaForCausalLM" in why
    assert "not a reward model" in reward_problem(ModelSource(ref="smollm2-135m-instruct", kind="packaged"))


def test_mean_pooling_averages_the_response_and_ignores_padding(classifier):
    from align.rewards.scoring import _trunk_and_head, score_batch

    seq, other = [5, 6, 7, 8, 9, 10], [11, 12, 13]
    classifier.reward_pooling = "mean"
    try:
        alone = score_sequences(classifier, [seq], pad_id=2, starts=[3])[0]
        batched = score_sequences(classifier, [other, seq], pad_id=2, batch_size=2, starts=[1, 3])[1]
        trunk, head = _trunk_and_head(classifier)
        with torch.no_grad():
            hidden = trunk(input_ids=torch.tensor([seq])).last_hidden_state
            by_hand = head(hidden[0, 3:].mean(dim=0)).item()
            whole = score_batch(classifier, torch.tensor([seq]), torch.ones(1, 6, dtype=torch.long)).item()
    finally:
        classifier.reward_pooling = "last"
    assert alone == pytest.approx(by_hand, abs=1e-5)
    assert batched == pytest.approx(alone, abs=1e-5)
    assert whole != pytest.approx(alone, abs=1e-4)  # without `starts` the prompt is averaged in too
