"""The sampling copy decodes as the LoRA policy does, shares the frozen weights, and never moves the
reference (the policy with its adapter switched off)."""

import torch
from peft import LoraConfig, get_peft_model

from align.rl.sampling_copy import build
from align.models.tiny import make_model, make_tokenizer


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


def test_a_bf16_copy_follows_the_policy_as_bf16_sampling_would():
    """The bf16 copy holds its own bf16 weights (nothing shared with the fp32 policy, which stays as it was)
    and gives the logits the policy gives under bf16 autocast, after each round of training."""
    policy, _ = _policy(layers_to_transform=[1, 2])
    copy = build(policy, dtype=torch.bfloat16)
    base = policy.get_base_model()
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    shared = base.model.layers[0].self_attn.q_proj.weight
    assert copy.model.model.layers[0].self_attn.q_proj.weight.data_ptr() != shared.data_ptr()
    assert {p.dtype for p in copy.model.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 60, (2, 9))
    for seed in (0, 1):
        _train_adapter(policy, seed)
        model = copy.sync()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = policy(input_ids=ids).logits.float()
        got = model(input_ids=ids).logits.float()
        with policy.disable_adapter():
            off = policy(input_ids=ids).logits
        rounding, adapter = (got - expected).abs().mean(), (expected - off).abs().mean()
        assert rounding < 0.1 * adapter  # bf16 rounding (residual stream too) is small next to the adapter
    assert all(p.dtype == torch.float32 for p in base.parameters())
    assert all(torch.equal(p, before[name]) for name, p in base.named_parameters() if "lora_" not in name)


def test_a_policy_kept_in_fp32_samples_from_its_copy_in_fp32():
    """`mixed_precision: no` keeps a stage's no-grad passes in fp32 (`mark`); its copy follows, so rollouts are
    not sampled under the device's bf16 autocast (the CPU rule for an unmarked model)."""
    from align.runtime.precision import Device, inference_dtype, mark, resolve, simulate

    bf16_cpu = Device("cpu", "simulated bf16 CPU", bf16=True, fp16=False)
    with simulate(bf16_cpu):
        policy, _ = _policy()
        unmarked = build(policy)
        assert inference_dtype(unmarked.model) == "bf16"  # the device's rule, for a model no stage marked
        mark(policy, resolve("auto", "no", "lora", bf16_cpu))
        copy = build(policy)
        assert inference_dtype(policy) is None and inference_dtype(copy.model) is None
