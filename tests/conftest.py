"""Shared fixtures: the two tiny tokenizers (built once per session) and a registry in a temp folder."""

from __future__ import annotations

import pytest

from align.registry import Registry
from align.tiny import make_tokenizer


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """ChatML template, pad == eos (like SmolLM2); the template writes no separate BOS."""
    return make_tokenizer("chatml")


@pytest.fixture(scope="session")
def llama2_tokenizer():
    """Llama-2 style template that writes its own BOS and puts a space before assistant content."""
    return make_tokenizer("llama2")


@pytest.fixture
def tmp_registry(tmp_path):
    return Registry(tmp_path / "registry")
