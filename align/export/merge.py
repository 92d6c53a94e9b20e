"""`align merge`: fold a LoRA adapter entry into full weights, check it, and register the result.

Why it is built this way:
- The adapter's parent is loaded in fp32 and the adapter merged there with peft's `merge_and_unload`.
  A QLoRA entry is no exception: its base is reloaded from full-precision weights, never from 4-bit ones,
  because adding B·A to 4-bit weights and rounding back throws most of the update away. A model that is
  quantized (a bitsandbytes load, packed integer weights) or a quantized `--dtype` is refused, with what
  to do instead.
- The unmerged adapter's outputs on sample inputs are the reference (`align.export.parity`); the merged model,
  cast to the requested dtype, must reproduce them within that dtype's tolerance, or nothing is
  registered. The figures go into the manifest.
- A merged entry keeps its source's kind (policy or reward) with a full-weights artifact, so everything
  that took the adapter entry (a stage's `from:`, `align score`, PPO reward sources) takes the merged one
  the same way; a reward entry becomes one sequence-classification model with its score head. The
  manifest records lineage: parent = the adapter entry, its base, the adapter settings, the tokenizer
  and chat-template hashes, and a `merge` block with the parity figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from align.errors import ExportError
from align.registry.fingerprint import library_versions, tokenizer_facts
from align.models.loading import ModelSource, adapter_parent, load_causal_lm, load_sequence_classifier, load_tokenizer
from align.export.parity import Sample, compare, describe, model_outputs, sample_inputs
from align.registry.store import Entry, Registry
from align.models.stop_tokens import stop_token_ids

log = logging.getLogger(__name__)

MERGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"f32": "fp32", "float32": "fp32", "f16": "fp16", "float16": "fp16", "bfloat16": "bf16"}
QUANTIZED_DTYPES = {"4bit", "nf4", "fp4", "int4", "8bit", "int8", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k",
                    "q6_k", "q8_0", "gptq", "awq"}
_HOW_TO_QUANTIZE = ("merge in fp32 (the default), bf16 or fp16, then quantize the merged model: "
                    "`align export REF --format gguf --dtype q8_0`, or `method: qlora` in a recipe, which "
                    "quantizes on load")


def merge_dtype(name: str) -> str:
    """The canonical name of a merge dtype; quantized types are refused with what to do instead."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key in QUANTIZED_DTYPES:
        raise ExportError(f"--dtype {name}: an adapter is never merged into quantized weights (rounding to "
                          f"{name} would erase most of the adapter's update); {_HOW_TO_QUANTIZE}")
    if key not in MERGE_DTYPES:
        raise ExportError(f"--dtype {name}: unknown; use one of {', '.join(MERGE_DTYPES)}")
    return key


def quantization_problem(model) -> str | None:
    """Why `model` (or a peft model's base) holds quantized weights, or None when they are full precision."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(base, flag, False):
            return f"it was loaded with {flag.removeprefix('is_loaded_in_')} weights"
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if config is not None:
        settings = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        if not settings.get("dequantize", False):  # a GGUF load dequantized to floats is full precision
            bits = "4-bit" if settings.get("load_in_4bit") else "8-bit" if settings.get("load_in_8bit") else None
            method = settings.get("quant_method", "unknown")
            return f"its config carries a {bits or method} quantization_config (quant_method {method})"
    for name, module in base.named_modules():
        kind = type(module).__name__
        if kind in {"Linear4bit", "Linear8bitLt", "QuantLinear", "GgufLinear"}:
            return f"layer {name} is a {kind}"
    for name, param in base.named_parameters():
        if not param.dtype.is_floating_point:
            return f"parameter {name} is stored as {param.dtype}"
    return None


def merge_adapter(model):
    """peft's `merge_and_unload`, refused when the weights it would merge into are quantized."""
    problem = quantization_problem(model)
    if problem:
        raise ExportError(f"refusing to merge an adapter into a quantized model ({problem}): the merged weights "
                          "would be rounded back to low precision and lose the adapter's update. Load the base "
                          "in fp32/bf16/fp16 and merge there (`align merge` does this for QLoRA entries), then "
                          f"quantize if needed: {_HOW_TO_QUANTIZE}")
    return model.merge_and_unload()


@dataclass
class Merged:
    """An adapter entry merged in memory: the model, what it was checked against, and the figures."""

    entry: Entry
    model: object
    tokenizer: object
    task: str  # "causal" or "classifier"
    dtype: str
    samples: list[Sample]
    reference: list[torch.Tensor]  # the unmerged adapter's outputs (fp32)
    parity: dict = field(default_factory=dict)


def task_of(entry: Entry | None) -> str:
    return "classifier" if entry is not None and entry.kind == "reward" else "causal"


def merge_entry(entry: Entry, registry: Registry, dtype: str = "fp32") -> Merged:
    """Merge an adapter entry (policy or reward) into its parent's fp32 weights, cast to `dtype`, and check
    the result against the unmerged adapter; raises `ExportError` if it is not an adapter or not within
    tolerance."""
    from peft import PeftModel

    dtype = merge_dtype(dtype)
    if entry.artifact.get("type") != "adapter":
        raise ExportError(f"{entry.ref} holds full weights, not an adapter: there is nothing to merge "
                          f"(export it directly: align export {entry.ref} --format hf)")
    source = ModelSource(ref=entry.ref, kind="registry", entry=entry)
    tokenizer = load_tokenizer(source, registry)
    task = task_of(entry)
    parent = adapter_parent(entry, registry)
    method = (entry.manifest.get("adapter") or {}).get("method", "lora")
    log.info("merging %s (%s adapter) into %s, loaded in fp32%s", entry.ref, method, parent.describe(),
             " (not 4-bit: QLoRA's base is reloaded in full precision)" if method == "qlora" else "")
    if task == "classifier":
        base = load_sequence_classifier(parent, registry, dtype="fp32", pad_token_id=tokenizer.pad_token_id)
    else:
        base = load_causal_lm(parent, registry, dtype="fp32")
    model = PeftModel.from_pretrained(base, str(entry.file(entry.artifact["path"])))
    pooling = entry.artifact.get("pooling") or "last"
    model.reward_pooling = pooling
    samples = sample_inputs(tokenizer)
    reference = model_outputs(model, samples, task)
    merged = merge_adapter(model).to(MERGE_DTYPES[dtype])
    merged.reward_pooling = pooling
    merged.eval()
    parity = compare(reference, model_outputs(merged, samples, task), dtype)
    log.info("merged %s vs unmerged adapter: %s", entry.ref, describe(parity))
    if not parity["passed"]:
        raise ExportError(f"{entry.ref}: the merged model does not reproduce the adapter's outputs: "
                          f"{describe(parity)}; nothing was registered")
    if task == "causal":
        stops = stop_token_ids(tokenizer, merged.generation_config.eos_token_id)
        merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    return Merged(entry, merged, tokenizer, task, dtype, samples, reference, parity)


def register_merged(merged: Merged, registry: Registry, name: str | None = None) -> Entry:
    """Save a merged model as a new entry (atomically), kind kept, lineage pointing at the adapter entry."""
    entry, model = merged.entry, merged.model
    name = name or f"{entry.name}-merged"
    manifest = entry.manifest
    artifact = {"type": "full", "path": "model"}
    if merged.task == "classifier":
        artifact.update({key: entry.artifact[key] for key in ("head", "pooling") if key in entry.artifact})
    with registry.create(name, entry.kind) as draft:
        model.save_pretrained(draft.path / "model", safe_serialization=True)
        merged.tokenizer.save_pretrained(draft.path / "tokenizer")
        draft.manifest.update({
            "stage": manifest.get("stage"),
            "recipe": manifest.get("recipe"),
            "artifact": artifact,
            "parent": {"source": "registry", "ref": entry.ref},
            "base": manifest.get("base"),
            "adapter": manifest.get("adapter"),
            "merge": {"from": entry.ref, "applies_to": entry.artifact.get("applies_to"),
                      "method": "peft merge_and_unload", "base_precision": "fp32", "dtype": merged.dtype,
                      "parity_vs_adapter": merged.parity},
            "tokenizer": {"path": "tokenizer", **tokenizer_facts(merged.tokenizer)},
            "model": {"architecture": model.config.architectures or [type(model).__name__],
                      "parameters": sum(p.numel() for p in model.parameters()), "dtype": merged.dtype},
            "metrics": manifest.get("metrics") or {},
            "metrics_from": entry.ref,
            **({"gate": manifest["gate"]} if "gate" in manifest else {}),
            "versions": library_versions(),
        })
    log.info("registered %s (merged from %s)", draft.entry.ref, entry.ref)
    return draft.entry


def merge(ref: str, registry: Registry, dtype: str = "fp32", name: str | None = None) -> Entry:
    """Resolve, merge, check and register: what `align merge REF` does."""
    merge_dtype(dtype)  # refuse a quantized dtype before any weights load
    return register_merged(merge_entry(registry.resolve(ref), registry, dtype), registry, name)
