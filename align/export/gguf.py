"""A llama-family causal LM as one GGUF file, written with the `gguf` package's `GGUFWriter`.

Why it is built this way:
- Our own conversion, small because it covers one family: hyperparameters under `llama.*`, tensors
  renamed with gguf's own name map (`get_tensor_name_map`), the tokenizer from `gguf_vocab`. The one
  layout change is llama.cpp's rotary convention: q and k rows are reordered from transformers'
  "rotate half" to interleaved pairs, per head (k per KV head); transformers undoes it on load.
- Storage follows llama.cpp: 1-D tensors (norms) stay f32; matrices are f32, f16, bf16 or q8_0
  (`gguf.quants.quantize`); a matrix whose rows do not split into 32-value blocks falls back to f16 under
  q8_0. A tied LM head is not written (its absence tells loaders the embeddings are tied).
- What cannot be represented faithfully (biases, non-default RoPE scaling, another architecture, a
  reward model's score head) is refused with the alternative (`--format hf`), never written approximately.
- The file is checked by loading it back through transformers' GGUF loader (`from_pretrained(dir,
  gguf_file=...)`): the tokenizer must give the same ids and chat template, and the logits must match the
  source within the tolerance of the stored precision.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from align.errors import ExportError
from align.export.gguf_vocab import add_vocab, vocab_metadata
from align.models.packaged import strip_quantization
from align.export.parity import Sample, compare, describe, model_outputs

log = logging.getLogger(__name__)

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
_DTYPE_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}


def gguf_dtype(name: str) -> str:
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in GGUF_DTYPES:
        raise ExportError(f"--dtype {name}: GGUF export writes {', '.join(GGUF_DTYPES)}")
    return key


# model_type -> the transformers class this writer lays out as llama.cpp's `llama` architecture. Mistral's
# decoder is Llama's (llama.cpp's own converter writes it as `llama` too), its sliding window aside, which
# `check_supported` refuses where it would change the attention.
LLAMA_LAYOUT = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def check_architecture(model_type: str | None, architecture: str | None) -> None:
    """Refuse an architecture this writer does not lay out (from `config.json`'s `model_type` and
    `architectures`, so `align export` can refuse before any weights load or adapters merge)."""
    if model_type not in LLAMA_LAYOUT or not (architecture or "").endswith("ForCausalLM"):
        raise ExportError(f"GGUF export supports llama-family causal LMs (Llama, Mistral); this is {architecture} "
                          f"({model_type}). Export it with --format hf")


def check_supported(model) -> None:
    """Refuse models this writer cannot represent exactly."""
    config = model.config
    check_architecture(config.model_type, type(model).__name__)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("GGUF export: this model has attention/MLP biases, which the llama GGUF layout and "
                          "transformers' GGUF loader do not carry; export with --format hf")
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    if window is not None and window < config.max_position_embeddings:
        raise ExportError(f"GGUF export: sliding-window attention (a window of {window} tokens in a context of "
                          f"{config.max_position_embeddings}) is not written by this exporter; export with --format hf")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export: RoPE type {rope.get('rope_type')!r} is not written by this exporter; "
                          "export with --format hf")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ExportError("GGUF export: head_dim x heads differs from the hidden size, which transformers' GGUF "
                          "loader cannot rebuild; export with --format hf")


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


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
    """Write `model` (fp32 weights) and `tokenizer` to `path`; returns counts per stored type."""
    import gguf

    dtype = gguf_dtype(dtype)
    check_supported(model)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab = vocab_metadata(tokenizer, config.vocab_size)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if description:
        writer.add_description(description)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, vocab)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    stored: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if "rotary_emb" in hf_name:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"GGUF export: no GGUF name for tensor {hf_name}")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = interleave_rotary(array, heads)
        elif hf_name.endswith("k_proj.weight"):
            array = interleave_rotary(array, kv_heads)
        data, raw = encode(array, dtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        kind = raw.name if raw is not None else {np.float32: "F32", np.float16: "F16"}[data.dtype.type]
        stored[kind] = stored.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def verify_gguf(path: Path, tokenizer, samples: list[Sample], reference: list[torch.Tensor], dtype: str) -> dict:
    """Reload `path` with transformers' GGUF loader; compare tokenizer ids, chat template and logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # progress bars and "keys not parsed" notes from the GGUF loader
    try:
        loaded_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     config=_llama_config(path))
    finally:
        hf_logging.set_verbosity(verbosity)
    strip_quantization(model)
    tokens = tokenizer_round_trip(tokenizer, loaded_tok, samples)
    if not tokens["passed"]:
        raise ExportError(f"{path.name}: the tokenizer read back from the GGUF file differs: {tokens['problem']}")
    figures = compare(reference, model_outputs(model, samples), "q8_0" if dtype == "q8_0" else dtype)
    log.info("GGUF %s reloaded vs source: %s", path.name, describe(figures))
    if not figures["passed"]:
        raise ExportError(f"{path.name}: logits after reloading the GGUF file differ from the source: "
                          f"{describe(figures)}")
    return {"parity": figures, "tokenizer": tokens}


def _llama_config(path: Path):
    """The file's config as the `llama` architecture it is written in. transformers' GGUF reader renames a
    `llama` file whose `general.name` contains "mistral" to the mistral architecture, for which the gguf
    package it uses has no tensor map; the layout is Llama's either way."""
    from transformers import AutoConfig, LlamaConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if config.model_type == "llama":
        return config
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "sliding_window")}
    return LlamaConfig(**fields)


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
