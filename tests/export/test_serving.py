"""`align.export.serving`: every family's HF export holds what vLLM and TGI read (the class their registries map,
the 4.x spellings of the config keys their model code reads, stop ids, the chat template where TGI's router
looks, a tokenizer transformers 4.x loads, weights by the names they map), and a folder with one piece taken
out fails, naming the file, the key and the loader."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from align.errors import ExportError
from align.export import export_model
from align.export.serving import (
    FAMILIES,
    TGI_ROUTER,
    TOKENIZER_4X,
    VLLM_4X,
    Finding,
    _rope_findings,
    serving_findings,
)
from align.models.families import FAMILIES as TINY_FAMILIES
from align.models.families import family, save_family_model
from align.registry.store import Registry

MODEL_TYPE = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "mistral": "mistral",
              "phi3": "phi3"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each family's tiny base model exported with `align export --format hf` (the serving check runs inside)."""
    root = tmp_path_factory.mktemp("serving")
    registry = Registry(root / "registry")
    reports = {}
    for name in TINY_FAMILIES:
        base = save_family_model(root / f"{name}-base", name)
        reports[name] = export_model(str(base), registry, "hf", out=root / f"{name}-hf")
    return root, reports


def _ids(folder, name):
    """The family's end-of-turn and EOS ids, as the export's tokenizer.json numbers them."""
    vocab = {t["content"]: t["id"] for t in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}
    return vocab[family(name).end_of_turn], vocab[family(name).special["eos_token"]]


def _copy(exports, name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(exports[0] / f"{name}-hf", folder)
    return folder


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _where(findings):
    return [(f.file, f.key, f.loaders) for f in findings]


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_every_family_export_passes_and_names_the_classes_that_serve_it(exports, name):
    root, reports = exports
    folder = root / f"{name}-hf"
    serving = reports[name]["verification"]["serving"]
    model_type = MODEL_TYPE[name]
    assert serving == {"model_type": model_type, "architectures": [family(name).model_class],
                       "vllm": FAMILIES[model_type].vllm, "tgi": FAMILIES[model_type].tgi, "passed": True}
    assert serving_findings(folder, *_ids(folder, name)) == []
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] and config["torch_dtype"] == "float32"
    assert tokenizer["additional_special_tokens"] == list(family(name).extra)
    assert "extra_special_tokens" not in tokenizer and tokenizer["tokenizer_class"].endswith(("Tokenizer", "Fast"))
    assert tokenizer["chat_template"] == (folder / "chat_template.jinja").read_text()
    added = {entry["content"] for entry in tokenizer["added_tokens_decoder"].values()}
    assert {family(name).end_of_turn, tokenizer["eos_token"]} <= added
    if name == "gemma2":  # vLLM's Gemma 2 code wants both spellings of the activation
        assert config["hidden_act"] == config["hidden_activation"] == "gelu_pytorch_tanh"


@pytest.mark.parametrize(("name", "file", "change", "expected"), [
    ("llama3", "config.json", lambda c: c.pop("rope_theta"), ("config.json", "rope_theta", VLLM_4X)),
    ("gemma2", "config.json", lambda c: c.pop("hidden_act"), ("config.json", "hidden_act", "vLLM")),
    ("qwen2", "config.json", lambda c: c.pop("sliding_window"), ("config.json", "sliding_window", VLLM_4X)),
    ("qwen3", "config.json", lambda c: c.update(architectures=["Qwen3Model"]), ("config.json", "architectures",
                                                                                 "vLLM")),
    ("phi3", "config.json", lambda c: c.pop("torch_dtype"), ("config.json", "torch_dtype",
                                                            "vLLM before 0.24 (transformers 4.x configs)")),
    ("gemma2", "generation_config.json", lambda g: g.update(eos_token_id=1),
     ("generation_config.json", "eos_token_id", "vLLM and TGI")),
    ("phi3", "generation_config.json", lambda g: g.update(eos_token_id=[6]),
     ("generation_config.json", "eos_token_id", "TGI")),
    ("mistral", "tokenizer_config.json", lambda t: t.pop("chat_template"),
     ("tokenizer_config.json", "chat_template", TGI_ROUTER)),
    ("qwen3", "tokenizer_config.json", lambda t: t.update(tokenizer_class="TokenizersBackend"),
     ("tokenizer_config.json", "tokenizer_class", TOKENIZER_4X)),
    ("llama3", "tokenizer_config.json", lambda t: t.update(extra_special_tokens=t.pop("additional_special_tokens")),
     ("tokenizer_config.json", "extra_special_tokens", TOKENIZER_4X)),
    ("qwen2", "tokenizer_config.json", lambda t: t.update(add_bos_token="no"),
     ("tokenizer_config.json", "add_bos_token", TGI_ROUTER)),
])
def test_a_missing_or_wrong_piece_is_named_with_its_file_key_and_loader(exports, tmp_path, name, file, change,
                                                                        expected):
    folder = _copy(exports, name, tmp_path)
    _edit(folder / file, change)
    assert _where(serving_findings(folder, *_ids(folder, name))) == [expected]


@pytest.mark.parametrize(("name", "removed", "says"), [
    ("mistral", "lm_head.weight", "untied"),  # the head would stay random
    ("qwen2", "model.layers.0.self_attn.q_proj.bias", "1 of layer 0's tensors"),  # Qwen2's q/k/v biases
    ("qwen3", "model.layers.0.self_attn.k_norm.weight", "1 of layer 0's tensors"),  # Qwen3's q/k norms
])
def test_a_tensor_the_loaders_map_left_out_of_the_weights_is_named(exports, tmp_path, name, removed, says):
    folder = _copy(exports, name, tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    del weights[removed]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    findings = serving_findings(folder, *_ids(folder, name))
    assert _where(findings) == [("model.safetensors", removed, "vLLM and TGI")] and says in findings[0].problem


def test_the_generation_config_without_the_end_of_turn_names_both_ids(exports, tmp_path):
    folder = _copy(exports, "qwen2", tmp_path)
    end, eos = _ids(folder, "qwen2")
    _edit(folder / "generation_config.json", lambda g: g.update(eos_token_id=eos))
    assert serving_findings(folder, end, eos) == [Finding(
        "generation_config.json", "eos_token_id",
        f"{eos!r} lacks the chat template's end of turn ({end}): answers would run on past it", "vLLM and TGI")]


def test_rope_spellings_against_rope_parameters_by_hand():
    """Golden: what a transformers 4.x reader would take instead of transformers 5's `rope_parameters`."""
    llama31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert _rope_findings({"rope_parameters": llama31, "rope_theta": 500000.0,
                           "rope_scaling": {k: v for k, v in llama31.items() if k != "rope_theta"}}) == []
    assert [key for key, _, _ in _rope_findings({"rope_parameters": llama31})] == ["rope_theta", "rope_scaling"]
    partial = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
    assert [key for key, _, _ in _rope_findings({"rope_parameters": partial, "rope_theta": 10000.0})] == [
        "partial_rotary_factor"]
    assert _rope_findings({"rope_parameters": {"full_attention": {}, "sliding_attention": {}}}) == []


def test_an_export_missing_the_older_spellings_fails_naming_the_key_and_loader(exports, tmp_path, monkeypatch):
    """Without the legacy spellings (transformers 5's files as saved) the export is refused, nothing is left."""
    from align.export import hf

    monkeypatch.setattr(hf, "_add_legacy_spellings", lambda folder, dtype: None)
    with pytest.raises(ExportError) as info:
        export_model(str(exports[0] / "gemma2-base"), Registry(tmp_path / "registry"), "hf", out=tmp_path / "hf")
    message = str(info.value)
    for piece in ("config.json: rope_theta: missing, rope_parameters says 10000.0", "config.json: hidden_act: missing", VLLM_4X,
                  "tokenizer_config.json: chat_template: missing", TGI_ROUTER,
                  "tokenizer_config.json: extra_special_tokens", TOKENIZER_4X):
        assert piece in message, piece
    assert not (tmp_path / "hf").exists()
