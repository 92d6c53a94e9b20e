"""Scaled RoPE in GGUF (`align.export.gguf_rope`): Llama 3.1's `llama3` frequencies written as llama.cpp's
`rope_freqs` tensor (one divisor per rotary pair) and linear scaling as its `rope.scaling.factor`, both giving
transformers' own frequencies; the file reloads through transformers' GGUF loader with the source's logits, its
rope parameters restored from `align.rope_parameters`; other types are refused naming the type. The llama.cpp
run of the same model is tests/export/test_llama_cpp.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from align.errors import ExportError
from align.export import command
from align.export.gguf_layouts import check_config, check_rope
from align.export.gguf_rope import ROPE_PARAMETERS_KEY, base_frequencies, llama3_factors
from align.models.families import save_family_model
from align.registry.store import Registry

# Llama 3.1's factors with an original context that splits the tiny model's 8 rotary pairs (head_dim 16, base
# 500000: wavelengths 6.3, 32.5, 167, 866, ...) into kept (< 256/4), interpolated (64..256) and scaled (> 256).
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
LINEAR = {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0}


def save_scaled_llama3(folder, rope: dict | None = None):
    """The tiny Llama 3 family model with scaled RoPE (`rope`, LLAMA3 by default): the same weights, the
    rope parameters of its config.json replaced."""
    save_family_model(folder, "llama3")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = dict(rope or LLAMA3)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _llama_config(rope):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       rope_parameters=rope, architectures=["LlamaForCausalLM"])


def test_llama3_factors_give_transformers_own_frequencies():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factors = llama3_factors(LLAMA3, 16)
    assert factors.dtype == np.float32 and factors.shape == (8,)
    assert list(factors[:2]) == [1.0, 1.0] and list(factors[3:]) == [8.0] * 5  # kept, then scaled
    # the interpolated pair: wavelength 2pi * 500000^(4/16) = 167.08, smooth (256/167.08 - 1)/3 = 0.17740
    assert factors[2] == pytest.approx(1 / ((1 - 0.17740) / 8 + 0.17740), rel=1e-4) == pytest.approx(3.5685, rel=1e-4)
    expected, scale = ROPE_INIT_FUNCTIONS["llama3"](_llama_config(LLAMA3), None)
    llama_cpp = base_frequencies(500000.0, 16) / torch.from_numpy(factors)  # what ggml_rope_ext rotates with
    assert scale == 1.0 and torch.allclose(llama_cpp, expected, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The scaled tiny Llama 3 model exported to f32 GGUF: (folder, report, GGUF fields, tensors)."""
    from gguf import GGUFReader

    root = tmp_path_factory.mktemp("gguf-rope")
    base = save_scaled_llama3(root / "base")
    report = command.export_model(str(base), Registry(root / "registry"), "gguf", "f32", out=root / "gguf")
    path = next((root / "gguf").glob("*.gguf"))
    reader = GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.")}
    return path, report, fields, {t.name: np.array(t.data) for t in reader.tensors}


def test_llama3_scaling_is_written_as_rope_freqs_and_reloads_with_the_source_s_logits(exported):
    _, report, fields, tensors = exported
    assert np.array_equal(tensors["rope_freqs.weight"], llama3_factors(LLAMA3, 16))
    assert tensors["rope_freqs.weight"].dtype == np.float32
    assert "llama.rope.scaling.type" not in fields  # llama.cpp's converter writes the tensor alone
    assert json.loads(fields[ROPE_PARAMETERS_KEY]) == LLAMA3
    verification = report["verification"]
    assert verification["parity"]["passed"] and verification["parity"]["max_abs_diff"] < 1e-4
    assert verification["rope_frequency_gap"] < 1e-6


def test_transformers_gguf_loader_alone_would_reload_plain_rope_which_the_check_refuses(exported):
    """Without `align.rope_parameters` transformers reads the file as unscaled RoPE (it skips rope_freqs):
    the frequency check names the file."""
    from transformers import AutoModelForCausalLM

    path = exported[0]
    plain = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    assert plain.config.rope_parameters["rope_type"] == "default"
    with pytest.raises(ExportError, match=f"{path.name}: llama.cpp would rotate with other frequencies"):
        check_rope(path, plain)


def test_linear_scaling_is_written_as_llama_cpp_s_scaling_factor(tmp_path):
    from gguf import GGUFReader

    base = save_scaled_llama3(tmp_path / "base", LINEAR)
    report = command.export_model(str(base), Registry(tmp_path / "registry"), "gguf", "f32", out=tmp_path / "g")
    reader = GGUFReader(next((tmp_path / "g").glob("*.gguf")))
    assert (reader.fields["llama.rope.scaling.type"].contents(), reader.fields["llama.rope.scaling.factor"].contents()) \
        == ("linear", 4.0)
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}
    assert report["verification"]["parity"]["max_abs_diff"] < 1e-4 and report["verification"]["rope_frequency_gap"] < 1e-6


@pytest.mark.parametrize("model_type, rope, reason", [
    ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
     r"RoPE scaling 'yarn' is not written: its ramp and attention factor"),
    ("llama", {"rope_type": "dynamic", "factor": 2.0}, r"RoPE scaling 'dynamic' is not written: it rescales by sequence"),
    ("qwen2", LLAMA3, r"RoPE scaling 'llama3' is written for llama.cpp's llama only .*not its qwen2, which reads no rope"),
    ("qwen2", LINEAR, r"RoPE scaling 'linear' is written for llama.cpp's llama only"),
])
def test_other_rope_scaling_is_refused_naming_its_type(model_type, rope, reason):
    from transformers import AutoConfig

    config = _llama_config({"rope_theta": 500000.0, **rope}).to_dict()
    config = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    config.architectures = ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"]
    with pytest.raises(ExportError, match=reason) as info:
        check_config(config)
    assert str(info.value).endswith("export with --format hf")
