"""Whether an exported HF folder holds what vLLM and TGI read to serve it, per family, from the files alone.

What the loaders read (their source, in words):
- vLLM picks its model code from config.json's `architectures` through its registry: `LlamaForCausalLM` and
  `MistralForCausalLM` run its Llama code, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `Gemma2ForCausalLM` and
  `Phi3ForCausalLM` their own (Phi-3's on the Llama code, with fused `qkv_proj`/`gate_up_proj` weights). It reads
  the config through transformers' AutoConfig; before vLLM 0.24 that is transformers 4.x, whose configs hold the
  RoPE base only as the top-level `rope_theta` (scaled RoPE as `rope_scaling`, a partial rotary factor as
  `partial_rotary_factor`), and the model code takes `getattr(config, "rope_theta", 10000)` (1e6 for Qwen): a
  config with only transformers 5's `rope_parameters` runs with the wrong base and no error. Its Gemma 2 code
  refuses a config whose `hidden_act` and `hidden_activation` are not both `gelu_pytorch_tanh` (newer code reads
  `hidden_activation` only), asserts tied embeddings, and reads `head_dim`, `query_pre_attn_scalar`, both
  softcaps and `sliding_window`; its Llama, Qwen and Phi code refuses any `hidden_act` but `silu`. It stops at the
  tokenizer's EOS and at every id of generation_config.json's `eos_token_id`, takes the chat template from the
  tokenizer, and loads `*.safetensors` by transformers' names, skipping `lm_head` when embeddings are tied.
- TGI's router reads tokenizer_config.json with serde (`chat_template`, `bos_token`, `eos_token`,
  `tokenizer_class`, `add_bos_token`, `add_eos_token`, `completion_template`): one field of the wrong type drops
  the whole file and the chat template with it, and the template is found only there or in chat_template.json
  (never chat_template.jinja). It loads the tokenizer with transformers' AutoTokenizer (a 4.x from 4.51 on) and
  re-saves it as tokenizer.json for its Rust side. Its server picks the model code from `model_type` (llama and
  phi3: flash Llama; mistral, qwen2 and gemma2 their own; qwen3 through transformers' own class), reads the
  config through AutoConfig (so `rope_theta` again; Gemma 2's softcap must be a float; `sliding_window` is applied
  as written, and transformers 4.x defaults it to 4096 for Mistral and Qwen2 when the key is absent), replaces
  the tokenizer's EOS with generation_config.json's `eos_token_id` only when that is a list, and loads the
  safetensors by name (`lm_head.weight`, or `model.embed_tokens.weight` when tied).
- transformers 4.5x (what both run on) fails to load a tokenizer whose tokenizer_config.json has
  `extra_special_tokens` as a list (transformers 5's spelling of `additional_special_tokens`), and no 4.x
  resolves transformers 5's `TokenizersBackend` class.

The check reads JSON and safetensors headers only (no weights, no transformers), so every export runs it; each
finding names the file, the key and the loader that needs it, and all are reported at once.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from align.errors import ExportError
from align.registry.records import read_json_record
from align.models.stop_tokens import template_end_token_id

VLLM_4X = "vLLM before 0.24 and TGI (transformers 4.x configs)"
TGI_ROUTER = "TGI's router (serde: a mistyped field drops tokenizer_config.json)"
TOKENIZER_4X = "vLLM before 0.24 and TGI (transformers 4.x tokenizers)"
WEIGHTS_4X = "vLLM before 0.24 and TGI (transformers 4.x weight loading)"
BOTH = "vLLM and TGI"
MODEL_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "rms_norm_eps", "vocab_size", "max_position_embeddings", "hidden_act", "tie_word_embeddings")
PROJECTIONS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
TRANSFORMERS_5_TOKENIZERS = ("TokenizersBackend", "SentencePieceBackend", "PythonBackend", "MistralCommonBackend")
STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class Finding:
    """One thing a loader needs that the folder lacks or gets wrong."""

    file: str
    key: str
    problem: str
    loaders: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.problem} (read by {self.loaders})"


@dataclass(frozen=True)
class Family:
    """How vLLM and TGI serve one `model_type`: the class names, the config keys their code reads beyond
    `MODEL_KEYS` and `rope_theta`, and the names of layer 0's tensors their weight loaders map."""

    architecture: str
    vllm: str
    tgi: str
    keys: tuple[str, ...] = ()
    layer_weights: tuple[str, ...] = PROJECTIONS
    hidden_act: str = "silu"
    tied_only: bool = False


FAMILIES = {
    "llama": Family("LlamaForCausalLM", "llama.py (LlamaForCausalLM)", "flash Llama"),
    "mistral": Family("MistralForCausalLM", "llama.py (LlamaForCausalLM)", "flash Mistral", ("sliding_window",)),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2.py", "flash Qwen2", ("sliding_window",),
                    PROJECTIONS + tuple(f"self_attn.{p}_proj.bias" for p in "qkv")),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3.py", "transformers' Qwen3ForCausalLM", ("head_dim",),
                    PROJECTIONS + ("self_attn.q_norm.weight", "self_attn.k_norm.weight")),
    "gemma2": Family("Gemma2ForCausalLM", "gemma2.py", "flash Gemma2",
                     ("head_dim", "query_pre_attn_scalar", "hidden_activation", "attn_logit_softcapping",
                      "final_logit_softcapping", "sliding_window"),
                     PROJECTIONS + ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"),
                     hidden_act="gelu_pytorch_tanh", tied_only=True),
    "phi3": Family("Phi3ForCausalLM", "phi3.py (Llama code, fused projections)", "flash Llama (phi3)", (),
                   ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                    "mlp.down_proj.weight")),
}


def serving_findings(folder: Path, end_of_turn_id: int | None, eos_token_id: int | None) -> list[Finding]:
    """Every finding for `folder`; `end_of_turn_id` and `eos_token_id` are the tokenizer's (from
    `align.models.stop_tokens`), which generation_config.json must hold for both servers to stop."""
    folder = Path(folder)
    config = read_json_record(folder / "config.json")
    if not isinstance(config, dict):
        return [Finding("config.json", "(file)", "missing or not JSON", BOTH)]
    weights, weight_findings = _stored_weights(folder)
    return [*_config_findings(config, weights), *weight_findings, *_weight_name_findings(config, weights),
            *_generation_findings(read_json_record(folder / "generation_config.json"), end_of_turn_id, eos_token_id),
            *_tokenizer_findings(folder, config)]


def _config_findings(config: dict, weights: dict[str, str]) -> list[Finding]:
    found = []

    def finding(key, problem, loaders=VLLM_4X):
        found.append(Finding("config.json", key, problem, loaders))

    model_type, family = config.get("model_type"), FAMILIES.get(config.get("model_type"))
    if not isinstance(model_type, str):
        finding("model_type", "missing: TGI picks its model code by it, transformers its config class", BOTH)
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and architectures and all(isinstance(a, str) for a in architectures)):
        finding("architectures", "missing: vLLM picks its model class from it", "vLLM")
    elif family is not None and family.architecture not in architectures:
        finding("architectures", f"{architectures} has no {family.architecture}, the class vLLM's registry maps "
                f"for {model_type}", "vLLM")
    stored = sorted(set(weights.values()))
    if "torch_dtype" not in config:
        finding("torch_dtype", "missing: transformers 4.x's spelling of `dtype`, which `--dtype auto` reads",
                "vLLM before 0.24 (transformers 4.x configs)")
    elif len(stored) == 1 and STORED_DTYPES.get(stored[0]) not in (None, config["torch_dtype"]):
        finding("torch_dtype", f"{config['torch_dtype']!r}, but the weights are stored as {stored[0]}")
    found += [Finding("config.json", *item) for item in _rope_findings(config)]
    if family is None:
        return found
    for key in (*MODEL_KEYS, *family.keys):
        if key in config:
            continue
        if key == "hidden_act" and "hidden_activation" in family.keys:
            finding(key, f"missing: vLLM's {family.vllm} refuses a config without it equal to hidden_activation",
                    "vLLM")
        else:
            finding(key, f"missing: vLLM's {family.vllm} and TGI's {family.tgi} read it" +
                    (" (transformers 4.x then defaults it to 4096)" if key == "sliding_window" else ""))
    if "rope_theta" not in config and "rope_parameters" not in config:
        finding("rope_theta", "missing: each loader takes its own default base (vLLM's Qwen code 1e6, "
                "transformers 10000)")
    acts = {config.get("hidden_act"), config.get("hidden_activation", family.hidden_act)}
    if "hidden_act" in config and acts != {family.hidden_act}:
        finding("hidden_act", f"{config.get('hidden_act')!r} (hidden_activation {config.get('hidden_activation')!r}):"
                f" vLLM's {family.vllm} accepts only {family.hidden_act!r}", "vLLM")
    if family.tied_only and config.get("tie_word_embeddings") is False:
        finding("tie_word_embeddings", f"false: vLLM's {family.vllm} asserts tied embeddings", "vLLM")
    softcap = config.get("final_logit_softcapping")
    if model_type == "gemma2" and softcap is not None and not isinstance(softcap, float):
        finding("final_logit_softcapping", f"{softcap!r} is not a float: TGI's Gemma 2 asserts one", "TGI")
    return found


def _rope_findings(config: dict) -> list[tuple[str, str, str]]:
    """transformers 5's `rope_parameters` against the 4.x spellings a 4.x reader takes instead."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or not rope or set(rope) <= {"full_attention", "sliding_attention"}:
        return []  # nothing to compare (or per-layer-type parameters, which 4.x configs do not have)
    found = []
    if "rope_theta" in rope and config.get("rope_theta") != rope["rope_theta"]:
        problem = (f"{config.get('rope_theta', 'missing')}, rope_parameters says {rope['rope_theta']}: a 4.x "
                   "reader takes its default base instead")
        found.append(("rope_theta", problem, VLLM_4X))
    factor = rope.get("partial_rotary_factor", 1.0)
    if factor != 1.0 and config.get("partial_rotary_factor") != factor:
        problem = (f"{config.get('partial_rotary_factor', 'missing')}, rope_parameters says {factor}: a 4.x "
                   "reader rotates every dimension")
        found.append(("partial_rotary_factor", problem, VLLM_4X))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = config.get("rope_scaling")
    if kind != "default" and not (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == kind):
        problem = f"{scaling!r}, rope_parameters says rope_type {kind!r}: a 4.x reader runs unscaled RoPE"
        found.append(("rope_scaling", problem, VLLM_4X))
    return found


def _header(path: Path) -> dict:
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        return json.loads(handle.read(size))


def _stored_weights(folder: Path) -> tuple[dict[str, str], list[Finding]]:
    """{tensor name: safetensors dtype} over every shard, and what is wrong with the files."""
    index = read_json_record(folder / "model.safetensors.index.json")
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        files = sorted(set(index["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return {}, [Finding("model.safetensors", "(file)", "no safetensors weights (nor an index of shards)", BOTH)]
    weights, found = {}, []
    for name in files:
        try:
            header = _header(folder / name)
        except (OSError, ValueError, struct.error):
            found.append(Finding(name, "(file)", "missing or not a safetensors file", BOTH))
            continue
        if (header.get("__metadata__") or {}).get("format") != "pt":
            found.append(Finding(name, "__metadata__.format", "not 'pt': transformers 4.x refuses the file",
                                 WEIGHTS_4X))
        weights.update({key: info["dtype"] for key, info in header.items() if key != "__metadata__"})
    return weights, found


def _weight_name_findings(config: dict, weights: dict[str, str]) -> list[Finding]:
    family = FAMILIES.get(config.get("model_type"))
    if family is None or not weights:
        return []
    found = []
    strangers = sorted(n for n in weights if not (n.startswith("model.") or n == "lm_head.weight"))
    if strangers:
        found.append(Finding("model.safetensors", strangers[0], f"{len(strangers)} tensor name(s) outside "
                             "`model.` and `lm_head.weight`, which the loaders do not map", BOTH))
    missing = [n for n in family.layer_weights if f"model.layers.0.{n}" not in weights]
    if missing:
        found.append(Finding("model.safetensors", f"model.layers.0.{missing[0]}", f"missing ({len(missing)} of "
                             f"layer 0's tensors): vLLM's {family.vllm} and TGI's {family.tgi} load them", BOTH))
    if config.get("tie_word_embeddings") is False and "lm_head.weight" not in weights:
        found.append(Finding("model.safetensors", "lm_head.weight", "missing while embeddings are untied: the "
                             "head would stay uninitialised", BOTH))
    return found


def _generation_findings(generation, end_of_turn_id: int | None, eos_token_id: int | None) -> list[Finding]:
    if not isinstance(generation, dict):
        return [Finding("generation_config.json", "(file)", "missing: both servers read their stop ids from it",
                        BOTH)]
    eos = generation.get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else list(eos) if isinstance(eos, list) else []
    found = []
    if end_of_turn_id is not None and end_of_turn_id not in ids:
        found.append(Finding("generation_config.json", "eos_token_id", f"{eos!r} lacks the chat template's end of "
                             f"turn ({end_of_turn_id}): answers would run on past it", BOTH))
    if isinstance(eos, int) and eos_token_id is not None and eos != eos_token_id:
        found.append(Finding("generation_config.json", "eos_token_id", f"{eos} alone, not the tokenizer's EOS "
                             f"({eos_token_id}): TGI reads this file's ids only as a list", "TGI"))
    if isinstance(eos, list) and eos_token_id is not None and eos_token_id not in eos:
        found.append(Finding("generation_config.json", "eos_token_id", f"{eos} lacks the tokenizer's EOS "
                             f"({eos_token_id}), which TGI replaces by this list", "TGI"))
    return found


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def _tokenizer_findings(folder: Path, config: dict) -> list[Finding]:
    found = []

    def finding(key, problem, loaders=TGI_ROUTER):
        found.append(Finding("tokenizer_config.json", key, problem, loaders))

    if not (folder / "tokenizer.json").is_file():
        found.append(Finding("tokenizer.json", "(file)", "missing: the fast tokenizer both servers run", BOTH))
    tok = read_json_record(folder / "tokenizer_config.json")
    if not isinstance(tok, dict):
        return [*found, Finding("tokenizer_config.json", "(file)", "missing or not JSON", BOTH)]
    template = tok.get("chat_template")
    named = isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str)
                                               and isinstance(t.get("name"), str) for t in template)
    jinja = folder / "chat_template.jinja"
    if not (isinstance(template, str) and template) and not named and (template is not None or jinja.is_file()):
        finding("chat_template", "missing: TGI's router reads the template only here or in chat_template.json")
    if isinstance(template, str) and jinja.is_file() and jinja.read_text() != template:
        finding("chat_template", "differs from chat_template.jinja: transformers 5 and TGI would use different "
                "templates", BOTH)
    name = tok.get("tokenizer_class")
    if not isinstance(name, str):
        finding("tokenizer_class", "missing or not a string", f"{TGI_ROUTER}; {TOKENIZER_4X}")
    elif name in TRANSFORMERS_5_TOKENIZERS or not name.endswith(("Tokenizer", "TokenizerFast")):
        finding("tokenizer_class", f"{name!r}: no transformers 4.x resolves it (PreTrainedTokenizerFast does)",
                TOKENIZER_4X)
    for key, kind in (("add_bos_token", bool), ("add_eos_token", bool), ("completion_template", str)):
        if tok.get(key) is not None and not isinstance(tok[key], kind):
            finding(key, f"{tok[key]!r} is not a {kind.__name__}")
    eos = _token_text(tok.get("eos_token"))
    if not isinstance(eos, str):
        finding("eos_token", "missing or not a string: the templates and both servers' EOS", BOTH)
    bos = _token_text(tok.get("bos_token"))
    if config.get("bos_token_id") is not None and not isinstance(bos, str):
        finding("bos_token", f"{tok.get('bos_token')!r} while the model has a BOS id: templates write it", BOTH)
    extra = tok.get("extra_special_tokens")
    if isinstance(extra, list):
        finding("extra_special_tokens", "a list (transformers 5's spelling): transformers 4.5x fails to load the "
                "tokenizer; 4.x reads `additional_special_tokens`", TOKENIZER_4X)
    added = tok.get("added_tokens_decoder")
    if not isinstance(added, dict):
        finding("added_tokens_decoder", "missing: transformers 4.x takes the special tokens' ids from it",
                TOKENIZER_4X)
    else:
        known = {entry.get("content") for entry in added.values() if isinstance(entry, dict)}
        wanted = [_token_text(tok.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
        wanted += list(tok.get("additional_special_tokens") or [])
        absent = [t for t in wanted if isinstance(t, str) and t not in known]
        if absent:
            finding("added_tokens_decoder", f"lacks {absent}", TOKENIZER_4X)
    return found


def family_of(folder: Path) -> dict:
    """What serves the folder: its model_type and the classes vLLM and TGI pick for it."""
    config = read_json_record(Path(folder) / "config.json") or {}
    family = FAMILIES.get(config.get("model_type"))
    described = {"model_type": config.get("model_type"), "architectures": config.get("architectures")}
    if family is None:
        return {**described, "vllm": None, "tgi": None, "note": "not one of the checked families: "
                "architecture-specific keys not checked"}
    return {**described, "vllm": family.vllm, "tgi": family.tgi}


def check_serving(folder: Path, tokenizer) -> dict:
    """Raise ExportError naming every finding; else what serves the folder. `tokenizer` is the folder's own,
    reloaded, whose chat template's end of turn and EOS generation_config.json must hold."""
    findings = serving_findings(folder, template_end_token_id(tokenizer), tokenizer.eos_token_id)
    if findings:
        lines = "\n".join(f"  - {f}" for f in findings)
        raise ExportError(f"{Path(folder).name}: vLLM and TGI would not serve this export as written "
                          f"({len(findings)} problem{'s' if len(findings) != 1 else ''}):\n{lines}")
    return {**family_of(folder), "passed": True}
