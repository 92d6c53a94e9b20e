"""Content hashes for provenance: data files, configs, tokenizers and chat templates.

Hashes are short (16 hex digits of SHA-256): enough to tell two versions apart in a manifest, short
enough to read in an error message that says "template a1b2… differs from c3d4…".
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "align")


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def hash_json(value: Any) -> str:
    """Hash of a JSON-able value, independent of key order."""
    return short_hash(json.dumps(value, sort_keys=True, default=str, separators=(",", ":")).encode())


def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def chat_template_hash(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return None
    if isinstance(template, dict):
        return hash_json(template)
    return short_hash(template.encode())


def tokenizer_hash(tokenizer) -> str:
    """Vocabulary, special tokens and chat template: what must match for token ids to mean the same."""
    vocab = tokenizer.get_vocab()
    return hash_json({
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "template": chat_template_hash(tokenizer),
    })


def tokenizer_facts(tokenizer) -> dict:
    """What a manifest records about a tokenizer."""
    return {
        "hash": tokenizer_hash(tokenizer),
        "chat_template_hash": chat_template_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
    }


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
