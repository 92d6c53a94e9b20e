"""The frozen prefix run once for a policy and its reference: log-probs and gradients from the bottom blocks'
output equal the full pass's (fp32), with and without shared prompts, and the adapter-disabled reference
from the same prefix equals the base model's full pass."""

import pytest
import torch

from align.models.logprobs import frozen_prefix_states, sequence_logps
from align.models.shared_prompt import pair_groups
from align.models.tiny import make_model, make_tokenizer
import align.models.logprobs as logprobs
from tests.models.test_shared_prompt import _pairs, _spy


def _policy(blocks: int = 4, frozen: int = 2):
    from peft import LoraConfig, get_peft_model

    model = make_model(make_tokenizer("chatml"), seed=3, layers=blocks)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      layers_to_transform=list(range(frozen, blocks)))
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("shared", [True, False])
def test_policy_and_reference_from_the_prefix_equal_their_full_passes(shared, monkeypatch):
    model = _policy()
    ids, mask, labels, _ = _pairs()
    groups = pair_groups(len(ids)) if shared else None
    full, counts = sequence_logps(model, ids, mask, labels)
    with model.disable_adapter():
        full_reference, _ = sequence_logps(model, ids, mask, labels)
    assert not torch.allclose(full, full_reference, atol=1e-3)  # the adapter changes the answer

    taken = _spy(monkeypatch, logprobs)
    with torch.no_grad():
        prefix = frozen_prefix_states(model, ids, mask, labels, groups, 2)
    policy, policy_counts = sequence_logps(model, ids, mask, labels, groups, prefix=prefix, start=2)
    with torch.no_grad(), model.disable_adapter():
        reference, _ = sequence_logps(model, ids, mask, labels, groups, prefix=prefix, start=2)
    assert torch.equal(policy_counts, counts)
    assert torch.allclose(policy, full, atol=1e-5)
    assert torch.allclose(reference, full_reference, atol=1e-5)
    assert len(taken) == (3 if shared else 0) and all(t is not None for t in taken)  # prompts shared in every pass


def test_gradients_through_the_top_blocks_equal_the_full_pass():
    model = _policy()
    ids, mask, labels, _ = _pairs()
    sequence_logps(model, ids, mask, labels)[0].sum().backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with torch.no_grad():
        prefix = frozen_prefix_states(model, ids, mask, labels, pair_groups(len(ids)), 2)
    sequence_logps(model, ids, mask, labels, pair_groups(len(ids)), prefix=prefix, start=2)[0].sum().backward()
    assert full and all(torch.allclose(p.grad, full[n], atol=1e-5) for n, p in model.named_parameters()
                        if p.requires_grad)
    # the block numbering the prefix pass lent the top blocks is given back
    indices = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert indices == sorted(indices) and indices[-1] == 3
