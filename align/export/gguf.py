"""A causal LM as one GGUF file in llama.cpp's layout of its architecture, written with `gguf.GGUFWriter`.

Why it is built this way:
- Our own conversion, one writer for every family llama.cpp reads (Llama, Mistral, Qwen2, Qwen3, Gemma 2,
  Phi-3): what differs per architecture is a row of `gguf_layouts.LAYOUTS` (llama.cpp's architecture name,
  extra hyperparameters, which tensors change and how); tensors are renamed with gguf's own name map for
  that architecture (`get_tensor_name_map`), the tokenizer comes from `gguf_vocab`. Only the llama layout
  reorders q and k rows (llama.cpp's "norm" rope pairs neighbours; transformers undoes it on load); the
  others use NEOX rope, transformers' own order. Gemma's norm weights gain 1 (llama.cpp computes `x * w`).
- Storage follows llama.cpp: 1-D tensors (norms, biases) stay f32; matrices are f32, f16, bf16 or q8_0
  (`gguf.quants.quantize`); a matrix whose rows do not split into 32-value blocks falls back to f16 under
  q8_0. A tied LM head is not written (its absence tells loaders the embeddings are tied).
- What cannot be represented faithfully (RoPE scaling other than Llama 3.1's `llama3` and linear in the llama
  layout, which `gguf_rope` writes as llama.cpp reads them; biases a layout lacks, a sliding window llama.cpp
  would apply differently, another architecture, a reward model's score head) is refused with the
  alternative (`--format hf`), from the config alone, never written approximately.
- The file is checked by loading it back through transformers' GGUF loader (`from_pretrained(dir,
  gguf_file=...)`, its config completed from the file's keys): the tokenizer must give the same ids and chat
  template, the rotary frequencies must be those llama.cpp computes from the file, and the logits must match
  the source within the tolerance of the stored precision.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from align.errors import ExportError
from align.export.gguf_layouts import (
    Layout,
    check_config,
    check_rope,
    common_keys,
    full_rope_parameters,
    layout_for,
    reload_config,
    rotary_dims,
)
from align.export.gguf_rope import add_rope_scaling
from align.export.gguf_vocab import (
    add_vocab,
    transformers_reload_caveat,
    vocab_metadata,
)
from align.export.parity import Sample, compare, describe, model_outputs
from align.models.packaged import strip_quantization

log = logging.getLogger(__name__)

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
_DTYPE_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}


def gguf_dtype(name: str) -> str:
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in GGUF_DTYPES:
        raise ExportError(f"--dtype {name}: GGUF export writes {', '.join(GGUF_DTYPES)}")
    return key


def check_config_json(config: dict) -> None:
    """Refuse, from a `config.json`'s contents, what GGUF export cannot write (so `align export` refuses
    before any weights load or adapters merge)."""
    from transformers import AutoConfig

    layout_for(config.get("model_type"), (config.get("architectures") or [None])[0])
    fields = {k: v for k, v in config.items() if k != "model_type"}
    check_config(AutoConfig.for_model(config["model_type"], **fields))


def check_supported(model) -> Layout:
    """The layout `model` is written in; refuses what cannot be represented exactly."""
    return check_config(model.config, type(model).__name__)


def interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k rows (per head: first halves, then second halves of the rotary pairs) into
    llama.cpp's order (per head: pairs side by side)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def encode(array: np.ndarray, dtype: str):
    """(data, raw GGML type or None) for one tensor at the requested storage precision."""
    from gguf import GGMLQuantizationType, quants

    if array.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "f16":
        return array.astype(np.float16), None
    if dtype == "bf16":
        return quants.quantize(array.astype(np.float32), GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    if array.shape[-1] % 32 == 0:  # q8_0 works on blocks of 32 values along a row
        return quants.quantize(array.astype(np.float32), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def write_gguf(model, tokenizer, path: Path, dtype: str, name: str, description: str = "") -> dict:
    """Write `model` (fp32 weights) and `tokenizer` to `path` in its architecture's llama.cpp layout
    (`gguf_layouts.LAYOUTS`); returns counts per stored type."""
    import gguf

    dtype = gguf_dtype(dtype)
    layout = check_supported(model)
    config = model.config
    arch = getattr(gguf.MODEL_ARCH, layout.arch)
    vocab = vocab_metadata(tokenizer, config.vocab_size)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    if description:
        writer.add_description(description)
    writer.add_vocab_size(config.vocab_size)
    for method, value in common_keys(config) + layout.keys(config):
        getattr(writer, method)(value)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, vocab, name)  # general.name too, as the tokenizer needs it spelled
    stored = add_rope_scaling(writer, full_rope_parameters(config), rotary_dims(config))

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if (hf_name == "lm_head.weight" and tied) or "rotary_emb" in hf_name:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"GGUF export: no {layout.arch.lower()} GGUF name for tensor {hf_name}")
        data, raw = encode(layout_tensor(layout, hf_name, tensor, config), dtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        kind = raw.name if raw is not None else {np.float32: "F32", np.float16: "F16"}[data.dtype.type]
        stored[kind] = stored.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def layout_tensor(layout: Layout, hf_name: str, tensor: torch.Tensor, config) -> np.ndarray:
    """One source tensor as llama.cpp's layout stores it (fp32): q/k rows interleaved for the "norm" rope,
    norm weights shifted where the source computes `x * (1 + w)`."""
    array = tensor.detach().to(torch.float32).cpu().numpy()
    if layout.interleave_rotary and hf_name.endswith("q_proj.weight"):
        return interleave_rotary(array, config.num_attention_heads)
    if layout.interleave_rotary and hf_name.endswith("k_proj.weight"):
        return interleave_rotary(array, config.num_key_value_heads)
    if layout.norm_shift and hf_name.endswith("norm.weight"):
        return array + np.float32(layout.norm_shift)
    return array


def verify_gguf(path: Path, tokenizer, samples: list[Sample], reference: list[torch.Tensor], dtype: str) -> dict:
    """Reload `path` with transformers' GGUF loader (its config completed from the file's keys, as llama.cpp
    reads them: `gguf_layouts.reload_config`); compare tokenizer ids, chat template and logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # progress bars and "keys not parsed" notes from the GGUF loader
    try:
        loaded_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        config, arch = reload_config(path)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     config=config)
    finally:
        hf_logging.set_verbosity(verbosity)
    strip_quantization(model)
    rope_gap = check_rope(path, model)  # scaled RoPE: the reloaded frequencies are llama.cpp's
    caveat = transformers_reload_caveat(arch, tokenizer)  # its loader rebuilds some tokenizers by architecture
    if caveat is not None:
        log.warning("%s: token ids not compared after reloading (%s); llama.cpp reads the file's own: "
                    "align check-export runs it", path.name, caveat)
    tokens = tokenizer_round_trip(tokenizer, loaded_tok, samples if caveat is None else [])
    if not tokens["passed"]:
        raise ExportError(f"{path.name}: the tokenizer read back from the GGUF file differs: {tokens['problem']}")
    if caveat is not None:
        tokens["ids_not_compared"] = caveat
    figures = compare(reference, model_outputs(model, samples), "q8_0" if dtype == "q8_0" else dtype)
    log.info("GGUF %s reloaded as %s vs source: %s", path.name, type(model).__name__, describe(figures))
    if not figures["passed"]:
        raise ExportError(f"{path.name}: logits after reloading the GGUF file differ from the source: "
                          f"{describe(figures)}")
    return {"parity": figures, "tokenizer": tokens, "reloaded_as": type(model).__name__,
            "rope_frequency_gap": rope_gap}


def tokenizer_round_trip(source, loaded, samples: list[Sample]) -> dict:
    """Same ids for every sample text, same special ids, same chat template."""
    for sample in samples:
        ids = loaded(sample.text, add_special_tokens=False)["input_ids"]
        if ids != sample.ids:
            return {"passed": False, "problem": f"{sample.text[:40]!r} encodes to {ids[:12]}... instead of "
                                                f"{sample.ids[:12]}..."}
    for kind in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(loaded, kind) != getattr(source, kind):
            return {"passed": False, "problem": f"{kind} is {getattr(loaded, kind)}, not {getattr(source, kind)}"}
    if (loaded.chat_template or None) != (source.chat_template or None):
        return {"passed": False, "problem": "the chat template differs"}
    return {"passed": True, "samples": len(samples), "vocab_size": len(loaded)}
