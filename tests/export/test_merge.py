"""`align.export.merge` on tiny adapter entries: the merged model computes what the unmerged adapter computes (fp32,
tight), the manifest records the lineage, QLoRA entries merge into a full-precision base, merging into a
quantized model or to a quantized dtype is refused, a reward entry becomes one sequence classifier with
its score head, and a failed check registers nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from align.cli.main import main
from align.errors import ExportError
from align.registry.fingerprint import tokenizer_facts
from align.export.merge import merge, merge_adapter, merge_dtype, quantization_problem
from align.models.loading import ModelSource, load_causal_lm, load_tokenizer
from align.export.parity import TOLERANCES, model_outputs, sample_inputs
from align.registry.store import Registry
from align.rewards.scoring import load_reward_model
from tests.tiny_entries import register_adapter, unmerged


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "registry")


def test_merged_policy_reproduces_the_unmerged_adapter(registry, tiny_base):
    adapter = register_adapter(registry, tiny_base)
    merged = merge(adapter.ref, registry)
    assert merged.ref == "tiny/sft-merged@1"

    tokenizer = load_tokenizer(ModelSource(merged.ref, "registry", merged), registry)
    samples = sample_inputs(tokenizer)
    reference = model_outputs(unmerged(adapter), samples)
    model = load_causal_lm(ModelSource(merged.ref, "registry", merged), registry, dtype="fp32")
    got = model_outputs(model, samples)
    assert max(float((g - r).abs().max()) for g, r in zip(got, reference)) < 1e-4

    # The merge changed the weights (a random adapter, not the identity), and no adapter is left over.
    base = load_causal_lm(ModelSource(str(tiny_base), "local", path=str(tiny_base)), registry, dtype="fp32")
    assert max(float((g - b).abs().max()) for g, b in zip(got, model_outputs(base, samples))) > 1e-2
    assert not (merged.path / "model" / "adapter_config.json").exists()
    assert not any("lora" in name for name in model.state_dict())


def test_merged_manifest_records_lineage(registry, tiny_base):
    adapter = register_adapter(registry, tiny_base)
    m = merge(adapter.ref, registry).manifest
    assert m["kind"] == "policy" and m["artifact"] == {"type": "full", "path": "model"}
    assert m["parent"] == {"source": "registry", "ref": adapter.ref}
    assert m["base"] == adapter.manifest["base"] == {"source": "local", "path": str(tiny_base)}
    assert m["adapter"] == adapter.manifest["adapter"]
    assert m["tokenizer"]["hash"] == adapter.manifest["tokenizer"]["hash"]
    assert m["tokenizer"]["chat_template_hash"] == adapter.manifest["tokenizer"]["chat_template_hash"]
    assert m["merge"]["from"] == adapter.ref and m["merge"]["base_precision"] == "fp32"
    parity = m["merge"]["parity_vs_adapter"]
    assert parity["passed"] and parity["precision"] == "fp32" and parity["max_abs_diff"] < 1e-4
    assert parity["top1_agreement"] == 1.0
    assert m["metrics"] == adapter.manifest["metrics"] and m["metrics_from"] == adapter.ref
    # The generation config stops at the chat template's end-of-turn token.
    gen = json.loads(registry.resolve("tiny/sft-merged").file("model", "generation_config.json").read_text())
    im_end = load_tokenizer(ModelSource(adapter.ref, "registry", adapter), registry).convert_tokens_to_ids("<|im_end|>")
    assert im_end in ([gen["eos_token_id"]] if isinstance(gen["eos_token_id"], int) else gen["eos_token_id"])


def test_an_adapter_on_an_adapter_entry_merges_its_whole_chain(registry, tiny_base):
    """Like a PPO or DPO entry on its SFT entry: the parent adapter is merged first, then this one."""
    sft = register_adapter(registry, tiny_base)
    ppo = register_adapter(registry, tiny_base, name="tiny/ppo", on=sft, seed=1)
    entry = merge(ppo.ref, registry)
    assert entry.manifest["parent"] == {"source": "registry", "ref": ppo.ref}
    assert entry.manifest["merge"]["applies_to"] == {"source": "registry", "ref": sft.ref}
    tokenizer = load_tokenizer(ModelSource(entry.ref, "registry", entry), registry)
    samples = sample_inputs(tokenizer)
    model = load_causal_lm(ModelSource(entry.ref, "registry", entry), registry, dtype="fp32")
    got = model_outputs(model, samples)
    want = model_outputs(unmerged(ppo), samples)  # PPO's adapter over SFT's, merged independently
    assert max(float((g - w).abs().max()) for g, w in zip(got, want)) < 1e-4
    sft_only = model_outputs(unmerged(sft), samples)
    assert max(float((g - w).abs().max()) for g, w in zip(got, sft_only)) > 1e-2  # both adapters count


def test_merge_in_bf16_stores_bf16_within_its_tolerance(registry, tiny_base):
    adapter = register_adapter(registry, tiny_base)
    entry = merge(adapter.ref, registry, dtype="bf16", name="tiny/sft-bf16")
    with safe_open(str(entry.file("model", "model.safetensors")), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    parity = entry.manifest["merge"]["parity_vs_adapter"]
    assert parity["precision"] == "bf16" and parity["passed"]
    assert 1e-5 < parity["max_abs_diff"] <= parity["tolerance"]  # rounding shows, within the bf16 limit


def test_qlora_entry_merges_into_a_full_precision_base(registry, tiny_base, monkeypatch):
    """The QLoRA adapter goes onto the base loaded in fp32 without any quantization config."""
    import align.export.merge as merge_module

    calls = []
    real = merge_module.load_causal_lm

    def spy(source, reg, **kwargs):
        calls.append(kwargs)
        return real(source, reg, **kwargs)

    monkeypatch.setattr(merge_module, "load_causal_lm", spy)
    adapter = register_adapter(registry, tiny_base, name="tiny/qlora", method="qlora")
    entry = merge(adapter.ref, registry)
    assert calls == [{"dtype": "fp32"}]  # no `quantization=`: never a 4-bit base
    assert entry.manifest["adapter"]["method"] == "qlora"
    assert entry.manifest["merge"]["base_precision"] == "fp32"
    model = load_causal_lm(ModelSource(entry.ref, "registry", entry), registry, dtype="fp32")
    assert quantization_problem(model) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def _flagged_4bit(tiny_base):
    """A tiny peft model whose base claims to be a bitsandbytes 4-bit load (bnb cannot quantize on CPU)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    model.is_loaded_in_4bit = True
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))


def test_merging_into_a_4bit_model_is_refused(tiny_base):
    model = _flagged_4bit(tiny_base)
    before = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(ExportError) as err:
        merge_adapter(model)
    message = str(err.value)
    assert "quantized" in message and "4bit" in message
    assert "fp32" in message and "align merge" in message  # says what to do instead
    after = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(before, after)  # nothing was merged


def test_quantization_is_detected_from_config_and_packed_weights(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert quantization_problem(model) is None
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    assert "4-bit" in quantization_problem(model)
    model.config.quantization_config = {"quant_method": "gguf", "dequantize": True}  # dequantized GGUF load
    assert quantization_problem(model) is None
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.uint8), requires_grad=False)
    assert "torch.uint8" in quantization_problem(model)


@pytest.mark.parametrize("dtype", ["nf4", "4bit", "int8", "q8_0"])
def test_a_quantized_merge_dtype_is_refused(dtype):
    with pytest.raises(ExportError, match="never merged into quantized weights.*fp32"):
        merge_dtype(dtype)


def test_cli_refuses_a_quantized_dtype_before_loading(registry, tiny_base, capsys):
    adapter = register_adapter(registry, tiny_base)
    assert main(["--registry", str(registry.root), "merge", adapter.ref, "--dtype", "nf4"]) == 2
    _, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith("error: --dtype nf4: an adapter is never merged into quantized "
                                                   "weights")
    assert [e.ref for e in registry.list()] == [adapter.ref]


def test_reward_entry_merges_into_one_sequence_classifier(registry, tiny_base, monkeypatch):
    from align.rewards.scoring import score_sequences

    monkeypatch.setenv("ALIGN_BF16_INFERENCE", "0")  # exact fp32 scores, no bf16 autocast

    adapter = register_adapter(registry, tiny_base, name="tiny/reward", kind="reward")
    entry = merge(adapter.ref, registry)
    assert entry.kind == "reward" and entry.manifest["gate"] == adapter.manifest["gate"]
    assert entry.artifact == {"type": "full", "path": "model", "head": "score", "pooling": "last"}
    config = json.loads(entry.file("model", "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1

    # Scores of the merged entry, loaded the way PPO and `align score` load reward models, equal the
    # unmerged adapter's (whose score head lives in the adapter, not in the base).
    model, tokenizer = load_reward_model(ModelSource(entry.ref, "registry", entry), registry, dtype="fp32")
    sequences = [s.ids for s in sample_inputs(tokenizer)]
    reference = unmerged(adapter)
    want = score_sequences(reference, sequences, tokenizer.pad_token_id)
    got = score_sequences(model, sequences, tokenizer.pad_token_id)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    assert max(abs(a) for a in want) > 0.1  # a real head, not a zero one
    head = reference.base_model.model.score.modules_to_save["default"].weight
    assert torch.allclose(model.score.weight, head)


def test_an_entry_with_full_weights_has_nothing_to_merge(registry, tiny_base):
    adapter = register_adapter(registry, tiny_base)
    merged = merge(adapter.ref, registry)
    with pytest.raises(ExportError, match="holds full weights, not an adapter"):
        merge(merged.ref, registry)


def test_a_failed_parity_check_registers_nothing(registry, tiny_base, monkeypatch):
    adapter = register_adapter(registry, tiny_base)
    monkeypatch.setitem(TOLERANCES, "fp32", (-1.0, 0.0))  # no difference is small enough
    with pytest.raises(ExportError, match="does not reproduce the adapter's outputs.*nothing was registered"):
        merge(adapter.ref, registry)
    assert [e.ref for e in registry.list()] == [adapter.ref]
    assert not any((registry.root / ".staging").iterdir())


def test_tokenizer_of_the_merged_entry_is_the_adapters(registry, tiny_base):
    adapter = register_adapter(registry, tiny_base)
    entry = merge(adapter.ref, registry)
    tokenizer = load_tokenizer(ModelSource(entry.ref, "registry", entry), registry)
    assert tokenizer_facts(tokenizer) == {k: v for k, v in entry.manifest["tokenizer"].items() if k != "path"}
    source = load_tokenizer(ModelSource(adapter.ref, "registry", adapter), registry)
    assert tokenizer.chat_template == source.chat_template
