"""GGUF export of the families beyond the llama layout (`align.export.gguf_layouts`): each tiny family model is
written in llama.cpp's own architecture for it (read back with `gguf.GGUFReader`: the architecture name, the
hyperparameters llama.cpp reads, the tensors that differ from Llama's layout) and reloads through
transformers' GGUF loader as its own class with the source's logits (f32: within 1e-4; `align export` checks
that itself). What llama.cpp would run differently is refused from the config, naming the reason. The
llama.cpp run of the same files is tests/export/test_llama_cpp.py (where llama-cpp-python is installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from align.errors import ExportError
from align.export import command
from align.export.gguf_layouts import check_config
from align.models.families import family, make_family_tokenizer, save_family_model
from align.registry.store import Registry

ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "phi3": "phi3"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each family exported to GGUF f32 once, when first asked for: (report, fields, tensors, source state
    dict, config)."""
    root = tmp_path_factory.mktemp("gguf-layouts")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _export(root, name)
        return cache[name]
    return get


def _export(root, name):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    base = save_family_model(root / f"{name}-base", name)
    report = command.export_model(str(base), Registry(root / "registry"), "gguf", "f32", out=root / name)
    reader = GGUFReader(next((root / name).glob("*.gguf")))
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.")}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    source = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return report, fields, tensors, {k: v.numpy() for k, v in source.state_dict().items()}, source.config


@pytest.mark.parametrize("name", list(ARCH))
def test_each_family_is_written_in_its_llama_cpp_architecture_and_reloads_as_its_class(exported, name):
    report, fields, tensors, source, config = exported(name)
    arch = ARCH[name]
    assert fields["general.architecture"] == arch
    assert (fields[f"{arch}.block_count"], fields[f"{arch}.attention.head_count"],
            fields[f"{arch}.attention.head_count_kv"], fields[f"{arch}.attention.key_length"]) == \
        (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    assert fields[f"{arch}.rope.freq_base"] == config.rope_parameters["rope_theta"]
    verification = report["verification"]
    assert verification["reloaded_as"] == family(name).model_class
    assert verification["parity"]["passed"] and verification["parity"]["max_abs_diff"] < 1e-4
    # NEOX rope (transformers' own order): q rows are the source's, not llama's interleaved ones
    if name != "phi3":
        assert np.array_equal(tensors["blk.0.attn_q.weight"], source["model.layers.0.self_attn.q_proj.weight"])
    assert ("output.weight" in tensors) == (not config.tie_word_embeddings)


def test_qwen2_carries_its_qkv_biases(exported):
    _, _, tensors, source, _ = exported("qwen2")
    for part in "qkv":
        assert np.array_equal(tensors[f"blk.1.attn_{part}.bias"], source[f"model.layers.1.self_attn.{part}_proj.bias"])
    assert "blk.0.attn_output.bias" not in tensors  # Qwen2's o_proj has none


def test_qwen3_carries_its_qk_norms(exported):
    _, _, tensors, source, config = exported("qwen3")
    for part in "qk":
        norm = tensors[f"blk.0.attn_{part}_norm.weight"]
        assert norm.shape == (config.head_dim,)
        assert np.array_equal(norm, source[f"model.layers.0.self_attn.{part}_norm.weight"])


def test_gemma2_norms_gain_one_and_its_softcapping_and_window_are_written(exported):
    """Gemma 2 computes `x * (1 + w)`, llama.cpp `x * w`: every norm is written +1 (the attention and
    feed-forward norms before and after, and the final one); its LM head is the embeddings."""
    _, fields, tensors, source, config = exported("gemma2")
    norms = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
    for gguf_name, hf_name in norms.items():
        assert np.allclose(tensors[f"blk.1.{gguf_name}.weight"], source[f"model.layers.1.{hf_name}.weight"] + 1)
    assert np.allclose(tensors["output_norm.weight"], source["model.norm.weight"] + 1)
    assert (fields["gemma2.attn_logit_softcapping"], fields["gemma2.final_logit_softcapping"]) == (50.0, 30.0)
    assert fields["gemma2.attention.sliding_window"] == config.sliding_window == 4096
    assert "output.weight" not in tensors


def test_phi3_keeps_its_fused_projections_and_rope_dimensions(exported):
    _, fields, tensors, source, config = exported("phi3")
    qkv = tensors["blk.0.attn_qkv.weight"]
    assert qkv.shape == (3 * config.hidden_size, config.hidden_size)  # q, k, v rows in one matrix
    assert np.array_equal(qkv, source["model.layers.0.self_attn.qkv_proj.weight"])
    assert tensors["blk.0.ffn_up.weight"].shape == (2 * config.intermediate_size, config.hidden_size)  # gate, up
    assert fields["phi3.rope.dimension_count"] == config.head_dim  # partial_rotary_factor 1.0
    assert fields["phi3.rope.scaling.original_context_length"] == 512
    assert fields["phi3.attention.sliding_window"] == 0  # none, as llama.cpp's converter writes it


def test_a_head_dim_apart_from_hidden_over_heads_reloads(tmp_path):
    """Qwen3 (0.6B: 16 heads of 128 in a hidden size of 1024) and Gemma 2 size heads on their own; the file's
    key_length carries it, which transformers' GGUF reader leaves at Qwen3Config's default of 128."""
    base = save_family_model(tmp_path / "base", "qwen3")
    config = json.loads((base / "config.json").read_text())
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    wide = type(model.config)(**{**model.config.to_dict(), "head_dim": 32})  # 4 x 32 = 128 != 64
    torch.manual_seed(0)
    type(model)(wide).save_pretrained(base)
    report = command.export_model(str(base), Registry(tmp_path / "registry"), "gguf", "f32", out=tmp_path / "gguf")
    assert report["verification"]["parity"]["max_abs_diff"] < 1e-4


def _config(name, **changes):
    from transformers import AutoModelForCausalLM  # noqa: F401  (registers the config classes)

    from align.models.families import make_family_model

    config = make_family_model(name, make_family_tokenizer(name)).config
    for key, value in changes.items():
        setattr(config, key, value)
    config.architectures = [family(name).model_class]
    return config


@pytest.mark.parametrize("name, changes, reason", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1,
               "layer_types": ["full_attention", "sliding_attention"]},
     r"sliding-window attention \(a window of 64 tokens in a context of 512\) is not applied by llama.cpp's qwen2"),
    ("gemma2", {"sliding_window": 64, "layer_types": ["full_attention", "sliding_attention"]},
     r"on layers \[1\], where llama.cpp slides on every other layer from the first"),
    ("gemma2", {"query_pre_attn_scalar": 256}, r"query_pre_attn_scalar is 256, where llama.cpp scales .* 1/sqrt\(16\)"),
    ("gemma2", {"tie_word_embeddings": False}, r"LM head is not tied"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 8,
                                  "short_factor": [1.0] * 8, "partial_rotary_factor": 1.0}},
     r"longrope\) is not written: llama.cpp picks its long or short factors by context size"),
    ("qwen3", {"attention_bias": True}, r"attention biases, which the qwen3 GGUF layout does not carry"),
])
def test_what_llama_cpp_would_run_differently_is_refused_with_the_reason(name, changes, reason):
    with pytest.raises(ExportError, match=reason) as info:
        check_config(_config(name, **changes))
    assert str(info.value).endswith("export with --format hf")


def test_a_window_that_covers_the_context_is_no_window():
    check_config(_config("phi3", sliding_window=512))  # Phi-3's window, as long as the context: written
    check_config(_config("gemma2", sliding_window=16))  # Gemma 2's, on llama.cpp's layers: written
