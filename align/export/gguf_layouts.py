"""Per architecture, how llama.cpp lays out a transformers causal LM in GGUF: one table, one writer.

Why it is built this way:
- Every family llama.cpp reads differs from Llama's layout in a few named ways, so each is a row of
  `LAYOUTS` (keyed by transformers' `model_type`) and `gguf.write_gguf` stays one loop: llama.cpp's
  architecture name (tensor names then come from the `gguf` package's own map for it), whether q/k rows
  are reordered (only llama/mistral: llama.cpp's "norm" rope pairs neighbours, the others use NEOX, as
  transformers' rotate-half does), a shift added to norm weights (Gemma computes `x * (1 + w)`, llama.cpp
  `x * w`), whether a separate LM head can be written, how llama.cpp applies a sliding window, and the
  hyperparameters its loader reads beyond the common ones.
- What cannot be written faithfully is refused from the config alone (`problems`), so `align export`
  refuses from `config.json` before any weights load: RoPE scaling other than what a layout's
  `scaled_rope` names (llama3 and linear for llama: `gguf_rope`), biases a layout has no tensor for,
  a sliding window llama.cpp would not apply the same way, Gemma 2 settings llama.cpp derives itself.
- transformers' GGUF loader (the export's own check) reads fewer keys than llama.cpp: it leaves Qwen3's
  `head_dim`, Gemma 2's softcapping and attention scale and Phi-3's partial rotary at their class defaults.
  `reload_config` rebuilds those from the file's keys as llama.cpp interprets them, so the reload checks
  the file, not the source's config; scaled RoPE, which it reads not at all, from `align.rope_parameters`,
  checked against the frequencies llama.cpp computes from the file (`check_rope`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from align.errors import ExportError
from align.export.gguf_rope import (
    check_frequencies,
    scaling_problems,
    written_rope_parameters,
)

HF_INSTEAD = "export with --format hf"


@dataclass(frozen=True)
class Layout:
    """How one transformers architecture is written as one llama.cpp architecture."""

    arch: str  # the `gguf.MODEL_ARCH` member: llama.cpp's architecture
    model_class: str  # transformers' causal LM class of this model_type
    interleave_rotary: bool = False  # llama.cpp's "norm" rope: q/k rows reordered into adjacent pairs
    norm_shift: float = 0.0  # added to every norm weight
    separate_head: bool = True  # False: llama.cpp always projects with the token embeddings
    sliding: str = "none"  # how llama.cpp applies `sliding_window`: "none" (never), "alternate" (even layers)
    scaled_rope: tuple[str, ...] = ()  # the RoPE scaling types written (`gguf_rope`), checked in llama.cpp
    keys: Callable = field(default=lambda config: [])  # extra hyperparameters: [(GGUFWriter method, value)]
    problems: Callable = field(default=lambda config: [])  # what this architecture cannot write
    reload: Callable = field(default=lambda config, keys: config)  # the file's keys into transformers' config


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config) -> dict:
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}


def full_rope_parameters(config) -> dict:
    """The config's rope parameters with its base, as transformers reads them."""
    rope = dict(rope_parameters(config))
    rope.setdefault("rope_theta", float(getattr(config, "rope_theta", None) or 10000.0))
    return rope


def rotary_dims(config) -> int:
    return int(head_dim(config) * rope_parameters(config).get("partial_rotary_factor", 1.0))


def common_keys(config) -> list[tuple[str, object]]:
    """The hyperparameters every layout writes (method names of `gguf.GGUFWriter`)."""
    return [("add_context_length", config.max_position_embeddings), ("add_embedding_length", config.hidden_size),
            ("add_block_count", config.num_hidden_layers), ("add_feed_forward_length", config.intermediate_size),
            ("add_head_count", config.num_attention_heads), ("add_head_count_kv", config.num_key_value_heads),
            ("add_key_length", head_dim(config)), ("add_value_length", head_dim(config)),
            ("add_rope_dimension_count", rotary_dims(config)),
            ("add_rope_freq_base", float(full_rope_parameters(config)["rope_theta"])),
            ("add_layer_norm_rms_eps", config.rms_norm_eps)]


# ------------------------------------------------------------------------------------------- llama, mistral


def _as_llama(config, keys):
    """transformers' GGUF reader names a `llama` file whose `general.name` contains "mistral" as the mistral
    architecture, for which the gguf package it uses has no tensor map; the layout is Llama's either way."""
    from transformers import LlamaConfig

    if config.model_type == "llama":
        return config
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "sliding_window")}
    return LlamaConfig(**fields)


# ------------------------------------------------------------------------------------------------- gemma2


def _gemma2_attention_scalar(config) -> float:
    """llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for its 46-layer (27B) model,
    whatever the config's `query_pre_attn_scalar` says."""
    if config.num_hidden_layers == 46:
        return config.hidden_size // config.num_attention_heads
    return head_dim(config)


def _gemma2_keys(config):
    return [("add_attn_logit_softcapping", float(config.attn_logit_softcapping)),
            ("add_final_logit_softcapping", float(config.final_logit_softcapping)),
            # llama.cpp applies its default window (4096) when none is written; the context is a no-op window
            ("add_sliding_window", config.sliding_window or config.max_position_embeddings)]


def _gemma2_problems(config):
    problems = []
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is None:
            problems.append(f"{name} is off, which llama.cpp's gemma2 always applies")
    scalar = _gemma2_attention_scalar(config)
    if config.query_pre_attn_scalar != scalar:
        problems.append(f"query_pre_attn_scalar is {config.query_pre_attn_scalar}, where llama.cpp scales queries "
                        f"by 1/sqrt({scalar})")
    if getattr(config, "hidden_activation", None) not in ("gelu_pytorch_tanh", None):
        problems.append(f"hidden_activation {config.hidden_activation!r} is not llama.cpp's tanh GELU")
    return problems


def _gemma2_reload(config, keys):
    config.attn_logit_softcapping = keys.get("attn_logit_softcapping")
    config.final_logit_softcapping = keys.get("final_logit_softcapping")
    config.query_pre_attn_scalar = _gemma2_attention_scalar(config)
    return config


# --------------------------------------------------------------------------------------------------- phi3


def _phi3_keys(config):
    return [("add_rope_scaling_orig_ctx_len",
             getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings),
            ("add_sliding_window", getattr(config, "sliding_window", None) or 0)]  # 0: none, as llama.cpp's converter


def _phi3_problems(config):
    if head_dim(config) * config.num_attention_heads != config.hidden_size:
        return ["head_dim x heads differs from the hidden size, which llama.cpp's phi3 does not read"]
    return []


def _phi3_reload(config, keys):
    """llama.cpp's phi3 ignores a sliding window (refused where it would matter) and rotates the first
    `rope.dimension_count` dimensions of each head."""
    config.sliding_window = None
    rope = dict(rope_parameters(config))
    rope["partial_rotary_factor"] = keys["rope.dimension_count"] / head_dim(config)
    config.rope_parameters = rope
    if "rope.scaling.original_context_length" in keys:
        config.original_max_position_embeddings = keys["rope.scaling.original_context_length"]
    return config


# ------------------------------------------------------------------------------------------------ the table

LAYOUTS = {
    "llama": Layout("LLAMA", "LlamaForCausalLM", interleave_rotary=True, scaled_rope=("llama3", "linear"),
                    reload=_as_llama),
    # Mistral's decoder is Llama's (llama.cpp's own converter writes it as `llama`), its sliding window aside
    "mistral": Layout("LLAMA", "MistralForCausalLM", interleave_rotary=True, scaled_rope=("llama3", "linear"),
                      reload=_as_llama),
    "qwen2": Layout("QWEN2", "Qwen2ForCausalLM"),  # q/k/v biases: always there, written as attn_{q,k,v}.bias
    "qwen3": Layout("QWEN3", "Qwen3ForCausalLM"),  # q/k norms: attn_q_norm, attn_k_norm
    "gemma2": Layout("GEMMA2", "Gemma2ForCausalLM", norm_shift=1.0, separate_head=False, sliding="alternate",
                     keys=_gemma2_keys, problems=_gemma2_problems, reload=_gemma2_reload),
    "phi3": Layout("PHI3", "Phi3ForCausalLM", keys=_phi3_keys, problems=_phi3_problems, reload=_phi3_reload),
}


def layout_for(model_type: str | None, architecture: str | None) -> Layout:
    """The layout of a causal LM of `model_type`, or the refusal naming what GGUF export covers."""
    if model_type not in LAYOUTS or not (architecture or "").endswith("ForCausalLM"):
        names = ", ".join(layout.model_class.removesuffix("ForCausalLM") for layout in LAYOUTS.values())
        raise ExportError(f"GGUF export supports the causal LMs llama.cpp reads as we write them ({names}); "
                          f"this is {architecture} ({model_type}). Export it with --format hf")
    return LAYOUTS[model_type]


def layout_of_arch(arch: str) -> Layout:
    """The layout a file of llama.cpp architecture `arch` was written with (llama and mistral share one)."""
    import gguf

    for layout in LAYOUTS.values():
        if gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, layout.arch)] == arch:
            return layout
    raise ExportError(f"no GGUF layout for llama.cpp architecture {arch!r}")


def sliding_layers(config) -> list[int]:
    """The layers transformers runs with a sliding window."""
    types = getattr(config, "layer_types", None)
    if types is None:
        return list(range(config.num_hidden_layers)) if getattr(config, "sliding_window", None) else []
    return [i for i, kind in enumerate(types) if kind == "sliding_attention"]


def config_problems(config, layout: Layout) -> list[str]:
    """Why `config` cannot be written faithfully in `layout` (empty when it can)."""
    problems = scaling_problems(rope_parameters(config), layout.arch.lower(), layout.scaled_rope)
    for flag in ("attention_bias", "mlp_bias"):  # Qwen2's q/k/v biases are its layout's, not a flag
        if getattr(config, flag, False):
            problems.append(f"this model has {flag.replace('_', ' ')}es, which the {layout.arch.lower()} GGUF "
                            "layout does not carry")
    window, context = getattr(config, "sliding_window", None), config.max_position_embeddings
    layers = sliding_layers(config)
    if window is not None and window < context and layers:
        described = f"a window of {window} tokens in a context of {context}"
        if layout.sliding == "none":
            problems.append(f"sliding-window attention ({described}) is not applied by llama.cpp's "
                            f"{layout.arch.lower()}")
        elif layers != list(range(0, config.num_hidden_layers, 2)):
            problems.append(f"sliding-window attention ({described}) on layers {layers}, where llama.cpp slides "
                            "on every other layer from the first")
    if not layout.separate_head and not getattr(config, "tie_word_embeddings", True):
        problems.append(f"its LM head is not tied to the embeddings, and llama.cpp's {layout.arch.lower()} projects "
                        "with the embeddings")
    return problems + layout.problems(config)


def check_config(config, architecture: str | None = None) -> Layout:
    """The layout for `config` (a transformers config; `architecture` its causal LM class, else the config's
    own `architectures`), or one `ExportError` naming every problem."""
    architecture = architecture or (getattr(config, "architectures", None) or [None])[0]
    layout = layout_for(config.model_type, architecture)
    problems = config_problems(config, layout)
    if problems:
        raise ExportError(f"GGUF export of {architecture}: {'; '.join(problems)}; {HF_INSTEAD}")
    return layout


def file_keys(reader, arch: str) -> dict:
    """The architecture's own keys of a GGUF file (`{arch}.` stripped), as plain values."""
    return {name[len(arch) + 1:]: field.contents() for name, field in reader.fields.items()
            if name.startswith(f"{arch}.")}


def reload_config(path) -> tuple[object, str]:
    """transformers' config for the GGUF file at `path`, with what its GGUF reader leaves out read from the
    file's own keys (as llama.cpp reads them), and the file's llama.cpp architecture."""
    from gguf import GGUFReader
    from transformers import AutoConfig

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    layout = layout_of_arch(arch)
    keys = file_keys(reader, arch)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if "attention.key_length" in keys:
        config.head_dim = keys["attention.key_length"]
    rope = written_rope_parameters(reader)  # scaled RoPE, which transformers' reader leaves out
    if rope is not None:
        config.rope_parameters = rope
    return layout.reload(config, keys), arch


def check_rope(path, model) -> float:
    """The reloaded `model` rotates with the frequencies llama.cpp computes from the file at `path`
    (`gguf_rope.check_frequencies`); the largest relative gap."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return check_frequencies(path, reader, file_keys(reader, reader.fields["general.architecture"].contents()), model)
