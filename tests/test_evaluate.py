"""The evaluation hook's loss: token-weighted NLL over labelled tokens, equal to the model's own loss."""

from __future__ import annotations

import pytest
import torch

from align.data.tokenize import encode_conversation
from align.evaluate import _mean_nll
from align.tiny import make_model, make_tokenizer


def test_mean_nll_matches_the_models_own_loss_over_labelled_tokens():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, hidden=64).eval()
    data = [encode_conversation(tokenizer, [{"role": "user", "content": f"What is {i} + {i}?"},
                                            {"role": "assistant", "content": f"It is {2 * i}" + " ok" * i}], 128)
            for i in range(1, 6)]
    total, count = 0.0, 0
    with torch.no_grad():
        for e in data:  # one at a time, no padding: the reference value
            out = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            n = sum(1 for x in e.labels[1:] if x != -100)
            total, count = total + float(out.loss) * n, count + n
    assert _mean_nll(model, data, tokenizer.pad_token_id, batch_size=2) == pytest.approx(total / count, rel=1e-5)
