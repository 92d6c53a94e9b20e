"""Model references and loading: registry entries, the packaged default, hub ids, local folders, GGUF files.

`resolve_model_ref` answers "what is this ref?" without touching weights, so `align plan` can check a
whole pipeline cheaply. `load_tokenizer` / `load_causal_lm` then load what a resolved ref names; an
adapter entry loads its parent chain and merges each adapter into full-precision weights (never into
4-bit ones), so a stage that builds on an adapter entry sees exactly the model that entry describes.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError, RegistryError
from align.packaged import PACKAGED, load_from_gguf, pull
from align.registry import Entry, Registry, parse_ref

log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """What a model ref names. `kind` is one of: registry, packaged, local, gguf, hub."""

    ref: str
    kind: str
    entry: Entry | None = None
    path: str | None = None

    def describe(self) -> str:
        if self.kind == "registry":
            return f"registry entry {self.entry.ref} ({self.entry.kind}, {self.entry.artifact.get('type')})"
        if self.kind == "packaged":
            return f"packaged model {self.ref} (registered on first use from {PACKAGED[self.ref].requirement})"
        if self.kind == "hub":
            return f"hub model {self.ref}"
        return f"{self.kind} model at {self.path}"

    def lineage(self) -> dict:
        """How a manifest records this source as a parent or base."""
        if self.entry is not None:
            return {"source": "registry", "ref": self.entry.ref}
        if self.kind == "hub":
            return {"source": "hub", "id": self.ref}
        return {"source": self.kind, "path": self.path or self.ref}


def resolve_model_ref(ref: str, registry: Registry, *, check_hub: bool = True) -> ModelSource:
    """Say what `ref` is, or raise `RegistryError` naming it. Never loads weights."""
    ref = ref.strip()
    if not ref:
        raise RegistryError("empty model reference")
    entry = registry.find(ref)
    if entry is not None:
        return ModelSource(ref=ref, kind="registry", entry=entry)
    if ref in PACKAGED:
        return ModelSource(ref=ref, kind="packaged")
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RegistryError(f"{ref}: GGUF file not found")
        return ModelSource(ref=ref, kind="gguf", path=str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RegistryError(f"{ref}: folder has no config.json, so it is not a model directory")
        return ModelSource(ref=ref, kind="local", path=str(path.resolve()))
    name, version = parse_ref(ref)
    if registry.versions(name) or version is not None or name.split("/")[0] in registry.namespaces():
        registry.resolve(ref)  # raises with versions or close names
    if _HUB_ID.match(ref):
        if check_hub:
            _check_hub(ref)
        return ModelSource(ref=ref, kind="hub")
    registry.resolve(ref)  # raises: not an entry, not a path, not a hub id
    raise AssertionError("unreachable")


def _check_hub(repo_id: str) -> None:
    """A hub id is fine when cached; otherwise we ask the hub (a network error becomes a clear message)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RegistryError(f"{repo_id}: not in the local hub cache and HF_HUB_OFFLINE=1")
    try:
        from huggingface_hub import model_info

        model_info(repo_id, timeout=10)
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot use this ref"
        raise RegistryError(f"{repo_id}: not a registry entry or local path, and the hub did not confirm it "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None


# ------------------------------------------------------------------------------------------ loading


def materialize(source: ModelSource, registry: Registry) -> ModelSource:
    """Turn a packaged ref into its registry entry (pulling it once); other sources pass through."""
    if source.kind == "packaged":
        return ModelSource(ref=source.ref, kind="registry", entry=pull(source.ref, registry))
    return source


def load_tokenizer(source: ModelSource, registry: Registry):
    from transformers import AutoTokenizer

    source = materialize(source, registry)
    if source.entry is not None:
        return AutoTokenizer.from_pretrained(str(source.entry.file(source.entry.manifest["tokenizer"]["path"])))
    if source.kind == "gguf":
        return AutoTokenizer.from_pretrained(str(Path(source.path).parent), gguf_file=Path(source.path).name)
    tokenizer = AutoTokenizer.from_pretrained(source.path or source.ref)
    return tokenizer


def torch_dtype(name: str):
    """`auto` means bf16 on a GPU that supports it, else fp32 (CPU training stays in fp32 master weights)."""
    import torch

    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_causal_lm(source: ModelSource, registry: Registry, *, dtype: str = "auto", quantization=None):
    """Load a causal LM; adapter entries are merged into their parent's full-precision weights.

    `quantization` is a `transformers.BitsAndBytesConfig` for QLoRA: it applies to full-weight sources.
    An adapter chain under QLoRA is merged in full precision first, written to a cache folder and then
    quantized on load, so no adapter is ever merged into 4-bit weights.
    """
    from transformers import AutoModelForCausalLM

    source = materialize(source, registry)
    torch_type = torch_dtype(dtype)
    kwargs = {"dtype": torch_type}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": 0} if _cuda() else None
    if source.entry is not None:
        entry = source.entry
        if entry.artifact.get("type") == "adapter":
            merged = load_causal_lm(_parent_source(entry, registry), registry, dtype=dtype)
            from peft import PeftModel

            model = PeftModel.from_pretrained(merged, str(entry.file(entry.artifact["path"])))
            model = model.merge_and_unload()
            if quantization is not None:
                return _requantize(model, entry, kwargs)
            return model
        return AutoModelForCausalLM.from_pretrained(str(entry.file(entry.artifact["path"])), **kwargs)
    if source.kind == "gguf":
        if quantization is not None:
            raise AlignError("load a GGUF model once without quantization (register it), then quantize the entry")
        _, model = load_from_gguf(Path(source.path), dtype=torch_type)
        return model
    return AutoModelForCausalLM.from_pretrained(source.path or source.ref, **kwargs)


def _parent_source(entry: Entry, registry: Registry) -> ModelSource:
    """The model an adapter entry applies to: its recorded `artifact.applies_to` lineage."""
    target = entry.artifact.get("applies_to") or {}
    if target.get("source") == "registry":
        return ModelSource(ref=target["ref"], kind="registry", entry=registry.resolve(target["ref"]))
    if target.get("source") == "hub":
        return ModelSource(ref=target["id"], kind="hub")
    if target.get("source") in {"local", "gguf"}:
        return ModelSource(ref=target["path"], kind=target["source"], path=target["path"])
    raise RegistryError(f"{entry.ref}: adapter entry does not record the model it applies to")


def _requantize(model, entry: Entry, kwargs: dict):
    from transformers import AutoModelForCausalLM

    from align.packaged import cache_dir

    folder = cache_dir() / "merged" / entry.ref.replace("/", "--")
    if not (folder / "config.json").is_file():
        partial = folder.with_name(folder.name + ".partial")
        model.save_pretrained(partial, safe_serialization=True)
        os.replace(partial, folder)
    return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ adapters


def bnb_config(quant):
    """The BitsAndBytesConfig for a recipe's `quant:` block."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[quant.compute_dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=compute)


def four_bit_problem() -> str | None:
    """Why 4-bit QLoRA cannot run on this machine, or None when it can (checked at plan time)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"bitsandbytes cannot be imported ({type(err).__name__}: {err})"
    if _cuda():
        return None
    try:
        import torch
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
        F.dequantize_4bit(packed, state)
    except Exception as err:  # noqa: BLE001
        return f"bitsandbytes has no working 4-bit backend on this machine ({type(err).__name__}: {err})"
    return None


def lora_config(settings, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    targets = settings.targets if isinstance(settings.targets, list) else "all-linear"
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, task_type=task_type, modules_to_save=modules_to_save)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
