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
from align.models.packaged import PACKAGED, load_from_gguf, pull
from align.registry.store import Entry, Registry, parse_ref

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
    """Turn a packaged ref into its registry entry (pulling it once); other sources pass through. Every load
    goes through here, so an entry whose files are damaged (`align.registry.integrity`: sizes and headers, no weights
    read) is refused here, naming the entry and file, instead of crashing inside a library's loader."""
    from align.registry.integrity import require_whole

    if source.kind == "packaged":
        source = ModelSource(ref=source.ref, kind="registry", entry=pull(source.ref, registry))
    if source.entry is not None:
        require_whole(source, registry)
    return source


def load_tokenizer(source: ModelSource, registry: Registry):
    """The source's tokenizer, with the EOS as pad token where it has none (Llama 3, Mistral): every caller
    pads batches, and labels and attention masks are explicit, so the EOS is still learned and attended."""
    from transformers import AutoTokenizer

    source = materialize(source, registry)
    if source.entry is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(source.entry.file(source.entry.manifest["tokenizer"]["path"])))
    elif source.kind == "gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(Path(source.path).parent), gguf_file=Path(source.path).name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source.path or source.ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str):
    """The torch dtype of a dtype name; `auto` (loads for inference: chat, eval, scoring) is the device's
    native half dtype on a GPU, else fp32 (`align.runtime.precision`). Stages pass their resolved weights dtype."""
    from align.runtime import precision

    if name == "auto":
        device = precision.device_facts()
        name = (precision.best_half(device) or "fp32") if device.kind != "cpu" else "fp32"
    return precision.torch_dtype(name)


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
        kwargs["device_map"] = {"": local_rank()} if _cuda() else None  # this process's GPU
    if source.entry is not None:
        entry = source.entry
        if entry.artifact.get("type") == "adapter":
            parent = load_causal_lm(adapter_parent(entry, registry), registry, dtype=dtype)
            model = merge_adapter(parent, entry.file(entry.artifact["path"]))
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


def merge_adapter(model, folder: Path):
    """`model` with the LoRA adapter in `folder` merged into its weights. PEFT loads an adapter for inference and
    freezes every weight beneath it; once merged they are plain weights again and need gradients like those of
    any loaded model, or full fine-tuning from an adapter entry would train nothing."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder)).merge_and_unload().requires_grad_(True)


def adapter_parent(entry: Entry, registry: Registry) -> ModelSource:
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

    folder = _merged_folder(entry, lambda: model)
    return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)


def _merged_folder(entry: Entry, build) -> Path:
    """A cache folder holding an adapter entry merged into full-precision weights, written once (atomically)."""
    from align.models.packaged import cache_dir

    folder = cache_dir() / "merged" / entry.ref.replace("/", "--")
    if not (folder / "config.json").is_file():
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        build().save_pretrained(partial, safe_serialization=True)
        if (folder / "config.json").is_file():  # another process finished first
            import shutil

            shutil.rmtree(partial, ignore_errors=True)
        else:
            os.replace(partial, folder)
    return folder


def full_weights_folder(source: ModelSource, registry: Registry) -> str:
    """A folder (or hub id) with the full weights `source` describes, for loaders that need one (a reward
    model's sequence-classification head goes on these). Adapter chains and GGUF files are merged or
    converted once into the cache."""
    source = materialize(source, registry)
    entry = source.entry
    if entry is not None:
        if entry.artifact.get("type") == "adapter":
            return str(_merged_folder(entry, lambda: load_causal_lm(source, registry, dtype="fp32")))
        return str(entry.file(entry.artifact["path"]))
    if source.kind == "gguf":
        from align.models.packaged import cache_dir

        folder = cache_dir() / "converted" / Path(source.path).stem
        if not (folder / "config.json").is_file():
            _, model = load_from_gguf(Path(source.path))
            partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
            model.save_pretrained(partial, safe_serialization=True)
            os.replace(partial, folder)
        return str(folder)
    return source.path or source.ref


def load_sequence_classifier(source: ModelSource, registry: Registry, *, dtype: str = "auto", quantization=None,
                             pad_token_id: int | None = None):
    """A one-output sequence-classification model (a reward model) on the weights `source` describes; the
    score head is new (randomly initialized) unless the source already has one."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs = {"dtype": torch_dtype(dtype), "num_labels": 1}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": local_rank()} if _cuda() else None  # this process's GPU
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected here, not a warning
    try:
        model = AutoModelForSequenceClassification.from_pretrained(full_weights_folder(source, registry), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def use_attention(model, name: str):
    """Switch `model` (a PEFT model too) to the attention kernel a recipe's `attention:` names; `auto` keeps
    what transformers chose on load. Returns the model."""
    if name != "auto":
        model.set_attn_implementation(name)
    return model


def contiguous_head_input(model) -> None:
    """Make the LM head's input contiguous before it multiplies (once per model; a no-op when it already is).

    Why: decoding projects only the prompt's last position (`logits_to_keep=1` slices the hidden states, a
    non-contiguous view), and PyTorch multiplies a non-contiguous 3-D input by a weight that does not
    require grad through a batched matmul that first copies the weight once per row: [32, 576, 49152] for
    32 prompts on SmolLM2's head. Measured on 2 CPU cores: 2.4 s in bf16 and 0.16 s in fp32, against
    0.01-0.02 s for the contiguous input. Frozen models (sampling copies, evaluated entries) hit it at every
    prefill."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_align_contiguous_input", False):
        return

    def contiguous(module, args):
        return (args[0].contiguous(), *args[1:]) if args and not args[0].is_contiguous() else None

    head.register_forward_pre_hook(contiguous)
    head._align_contiguous_input = True


def local_rank() -> int:
    """This process's GPU index on its machine (LOCAL_RANK under accelerate launch / torchrun; else 0)."""
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ adapters


def bnb_config(cfg):
    """The BitsAndBytesConfig for a stage's `quant:` block (compute dtype from `align.runtime.precision`)."""
    from transformers import BitsAndBytesConfig

    from align.runtime.precision import quant_compute_dtype, torch_dtype as precision_dtype

    quant = cfg.quant
    compute = precision_dtype(quant_compute_dtype(cfg))
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


def lora_config(settings, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None,
                model=None, freeze_layers: int = 0):
    """PEFT LoraConfig for a recipe's `lora:` block. With `freeze_layers`, adapters go only on the blocks
    above the frozen ones (`model` is needed then, to name its linear layers and count its blocks)."""
    from peft import LoraConfig

    targets = settings.targets if isinstance(settings.targets, list) else "all-linear"
    layers = None
    if freeze_layers:
        layers = trainable_layer_indices(model, freeze_layers)
        if targets == "all-linear":
            targets = block_linear_names(model)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, task_type=task_type, modules_to_save=modules_to_save,
                      layers_to_transform=layers, layers_pattern="layers" if layers else None)


def trainable_layer_indices(model, freeze_layers: int) -> list[int]:
    total = model.config.num_hidden_layers
    if freeze_layers >= total:
        raise AlignError(f"freeze_layers is {freeze_layers} but the model has only {total} blocks; "
                         f"freeze at most {total - 1}")
    return list(range(freeze_layers, total))


def block_linear_names(model) -> list[str]:
    """Names of the linear layers inside the transformer blocks (what `all-linear` means there)."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if ".layers." in f".{name}" and isinstance(module, torch.nn.Linear):  # bnb Linear4bit is one too
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def freeze_bottom(model, freeze_layers: int) -> None:
    """Full fine-tuning with frozen embeddings and first blocks: their parameters stop needing gradients."""
    if not freeze_layers:
        return
    trainable_layer_indices(model, freeze_layers)  # validates the count
    import re

    for name, param in model.named_parameters():
        match = re.search(r"\.layers\.(\d+)\.", f".{name}")
        if "embed" in name or (match and int(match.group(1)) < freeze_layers):
            param.requires_grad_(False)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
