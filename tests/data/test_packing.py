"""SFT packing (`align.data.packing`): the layout never pads more than one conversation a row, positions restart
per conversation, and on the tiny Llama a packed batch gives the loss and gradients of the same conversations
unpacked (fp32, sdpa and eager), while a model whose attention ignored the boundaries is refused."""

from __future__ import annotations

import pytest
import torch

from align.data.packing import PackedCollator, first_fit, model_inputs, pack_layout, packing_problem
from align.data.sampling import pad_right
from align.data.tokenize import IGNORE, encode_conversation
from align.stages.sft_trainer import labelled_nll
from align.models.tiny import make_model, make_tokenizer

QUESTIONS = ["What is 3 + 4?", "Please write a short poem about the sea and the quick brown fox.", "Hello there?",
             "What is 12 + 7? Think step by step, then give the answer.", "Add 1 and 2.", "What is 9 - 5?"]


def _features(tokenizer, assistant_only: bool = True) -> list[dict]:
    out = []
    for i, question in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": f"#### {i * 7}"}]
        encoded = encode_conversation(tokenizer, messages, 128, assistant_only)
        out.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    return out


def _padded(features: list[dict], pad_id: int) -> dict:
    ids, mask = pad_right([f["input_ids"] for f in features], pad_id)
    labels, _ = pad_right([f["labels"] for f in features], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_first_fit_keeps_rows_within_the_width():
    lengths = [50, 30, 20, 70, 10, 40]
    rows = first_fit(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == 3


@pytest.mark.parametrize("lengths", [[60, 60, 60], [100, 100, 100], [10, 90, 45, 45, 30], [7]])
def test_pack_layout_never_pads_more_than_one_conversation_a_row(lengths):
    rows = pack_layout(lengths, 256)
    area = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
    assert area <= len(lengths) * max(lengths)
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)


def test_collator_restarts_positions_and_unscores_each_first_token(chatml_tokenizer):
    features = _features(chatml_tokenizer, assistant_only=False)
    batch = PackedCollator(chatml_tokenizer.pad_token_id, 256)(features)
    assert batch["input_ids"].shape[0] < len(features)  # several conversations share a row
    starts = (batch["position_ids"] == 0) & (batch["attention_mask"] == 1)
    assert int(starts.sum()) == len(features)
    assert (batch["labels"][starts] == IGNORE).all()
    # Every real token is there once, every labelled token but each conversation's first keeps its label.
    assert int(batch["attention_mask"].sum()) == sum(len(f["input_ids"]) for f in features)
    labelled = sum(sum(x != IGNORE for x in f["labels"][1:]) for f in features)
    assert int((batch["labels"] != IGNORE).sum()) == labelled


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("assistant_only", [True, False])
def test_packed_batch_gives_the_unpacked_loss_and_gradients(attention, assistant_only):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed=0, hidden=64)
    model.set_attn_implementation(attention)
    features = _features(tokenizer, assistant_only)
    packed = PackedCollator(tokenizer.pad_token_id, 256)(features)
    assert packed["input_ids"].shape[0] < len(features)

    def loss_and_grads(inputs):
        model.zero_grad()
        loss = labelled_nll(model, inputs)
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain_loss, plain_grads = loss_and_grads(_padded(features, tokenizer.pad_token_id))
    packed_loss, packed_grads = loss_and_grads(packed)
    assert packed_loss == pytest.approx(plain_loss, abs=1e-5)
    for a, b in zip(plain_grads, packed_grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_flash_attention_gets_one_row(monkeypatch):
    """Flash-attention kernels read packed boundaries from the position ids only in a single row."""
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    batch = PackedCollator(tokenizer.pad_token_id, 64)(_features(tokenizer))
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    ids, mask, labels, positions = model_inputs(model, batch)
    assert mask is None and ids.shape == labels.shape == positions.shape == (1, batch["input_ids"].numel())


def test_packing_probe_passes_the_tiny_llama_and_refuses_leaky_attention(monkeypatch):
    import transformers.masking_utils as masking

    model = make_model(make_tokenizer(), hidden=64)
    assert packing_problem(model) is None
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)  # boundaries ignored
    problem = packing_problem(model)
    assert problem is not None and "attend to each other" in problem and "packing: false" in problem
