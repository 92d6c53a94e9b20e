"""A plain copy of a LoRA policy for sampling rollouts: the base weights with the adapter's update folded in.

Why: decoding through PEFT's LoRA wrappers runs two extra small matmuls, a scale and an add for every
adapted linear at every generated token: with LoRA r=16 on the top 16 blocks of SmolLM2-135M, 64 rollouts
sample at 140 tokens/s through the wrappers and 176 from this copy (2 CPU cores, `benchmarks/rollout_speed.py`). Merging the
adapter into the policy in place is not an option: the reference is the same weights with the adapter
switched off, and merging then unmerging in bf16 does not give the weights back exactly, so the reference
would drift.

So the copy shares every tensor that the adapter does not touch with the policy (no memory), and holds its
own weight for each adapted linear, rewritten as `base + delta` before each rollout (`sync`): exact, with
nothing accumulating from one step to the next. Quantized bases (QLoRA) are not copied: `build` returns
None and rollouts decode through the adapter as before.

Where sampling runs in bf16 anyway (fp32 weights, hardware that multiplies bf16 natively: rollouts are
sampled under bf16 autocast), the copy holds bf16 weights instead (`dtype`): the same rounded values the
autocast would make, without casting every weight at every generated token. Then it shares nothing and
costs half the fp32 model's memory, and decodes faster (docs/results.md). Where the stage keeps its no-grad
passes in fp32 (`mixed_precision: no`), the fp32 copy carries that choice (`align.runtime.precision.mark`),
so its rollouts are not sampled under bf16 autocast either (the sampler-vs-policy mismatch figure,
`align.rl.logprob_mismatch`, shows ~1e-3 nats a token on the tiny test model otherwise).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_WRAPPER_PREFIX = "base_model.model."


class SamplingCopy:
    """`model`: the plain copy; `sync()` folds the current adapter weights in and returns it."""

    def __init__(self, policy, model, targets: dict[str, object], adapter: str):
        self.policy, self.model, self.targets, self.adapter = policy, model, targets, adapter

    @torch.no_grad()
    def sync(self):
        for name, layer in self.targets.items():
            merged = layer.base_layer.weight.float() + layer.get_delta_weight(self.adapter).float()
            weight = self.model.get_submodule(name).weight
            weight.copy_(merged.to(weight.dtype))
        return self.model


def build(policy, adapter: str = "default", dtype: torch.dtype | None = None) -> SamplingCopy | None:
    """A sampling copy of a PEFT LoRA `policy`, or None where one cannot be made exactly (quantized or
    non-LoRA wrappers, an adapter with extra trained modules). `dtype`: the copy's weights in that dtype
    (their own tensors) instead of the policy's (shared where the adapter does not touch them)."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from align.runtime.precision import MARK

    if not hasattr(policy, "peft_config") or getattr(policy.peft_config.get(adapter), "modules_to_save", None):
        return None
    targets: dict[str, object] = {}
    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            base = getattr(module, "base_layer", None)
            if not isinstance(base, torch.nn.Linear) or type(module).__name__ != "Linear":
                return None  # 4-bit/8-bit or non-linear LoRA layers: decode through the adapter
            targets[name.removeprefix(_WRAPPER_PREFIX)] = module
    if not targets:
        return None
    wrapped = policy.get_base_model()
    state = {}
    for name, tensor in wrapped.state_dict(keep_vars=True).items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    dtype = dtype or next(iter(targets.values())).base_layer.weight.dtype
    adapted = {f"{name}.weight" for name in targets}  # their own weight, rewritten by `sync`
    state = {k: v.detach().to(dtype, copy=k in adapted) if v.is_floating_point() else v.detach()
             for k, v in state.items()}
    copy = AutoModelForCausalLM.from_config(wrapped.config, dtype=dtype)
    missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding below
    if missing or unexpected:
        log.warning("sampling copy does not match the policy (%s); decoding through the adapter",
                    (missing or unexpected)[0])
        return None
    if getattr(wrapped.config, "tie_word_embeddings", False):
        copy.tie_weights()
    copy.requires_grad_(False)
    copy.eval()
    if hasattr(policy, MARK):  # the precision its stage resolved for no-grad passes, sampling included
        setattr(copy, MARK, getattr(policy, MARK))
    copy.generation_config = wrapped.generation_config
    return SamplingCopy(policy, copy.to(next(policy.parameters()).device), targets, adapter)
