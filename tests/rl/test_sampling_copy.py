"""The sampling copy decodes as the LoRA policy does, shares the frozen weights, and never moves the
reference (the policy with its adapter switched off)."""

import torch
from peft import LoraConfig, get_peft_model

from align.rl.sampling_copy import build
from align.tiny import make_model, make_tokenizer


def _policy(targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            layers_to_transform=None):
    tokenizer = make_tokenizer("chatml")
    model = make_model(tokenizer, seed=3, layers=3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0,
                        layers_to_transform=layers_to_transform)
    policy = get_peft_model(model, config).eval()
    return policy, tokenizer


def _train_adapter(policy, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.3)


def test_the_copy_gives_the_policys_logits_after_every_sync():
    policy, _ = _policy(layers_to_transform=[1, 2])
    copy = build(policy)
    assert copy is not None
    ids = torch.randint(3, 60, (2, 9))
    for seed in (0, 1):  # two rounds of "training": the copy follows each, nothing accumulates
        _train_adapter(policy, seed)
        model = copy.sync()
        expected = policy(input_ids=ids).logits
        with policy.disable_adapter():
            assert (expected - policy(input_ids=ids).logits).abs().max() > 1e-2  # the adapter matters
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)


def test_frozen_weights_are_shared_and_the_reference_is_untouched():
    policy, _ = _policy(layers_to_transform=[2])
    with policy.disable_adapter():
        ids = torch.randint(3, 60, (1, 7))
        reference_before = policy(input_ids=ids).logits
    copy = build(policy)
    _train_adapter(policy, 0)
    copy.sync()
    base = policy.get_base_model()
    shared = copy.model.model.layers[0].self_attn.q_proj.weight
    assert shared.data_ptr() == base.model.layers[0].self_attn.q_proj.weight.data_ptr()
    own = copy.model.model.layers[2].self_attn.q_proj.weight
    assert own.data_ptr() != base.model.layers[2].self_attn.q_proj.base_layer.weight.data_ptr()
    with policy.disable_adapter():
        assert torch.equal(policy(input_ids=ids).logits, reference_before)


def test_no_copy_for_a_plain_model():
    tokenizer = make_tokenizer("chatml")
    assert build(make_model(tokenizer)) is None
