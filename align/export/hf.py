"""A model as a self-contained Hugging Face directory that transformers, vLLM and TGI load with no edits.

Why it is built this way:
- The files are transformers' own (`save_pretrained` of model, generation config and tokenizer), so the
  format is whatever the loaders expect; we only settle what they read to decide behaviour:
  `generation_config.eos_token_id` holds the chat template's end-of-turn token and the tokenizer's EOS
  (`align.models.stop_tokens`), so generation stops where an assistant turn ends.
- transformers 5 writes a few things older readers (vLLM before 0.24 and TGI, on transformers 4.x) do not
  know: RoPE settings only under `rope_parameters`, the dtype only as `dtype`, tokenizer class
  `TokenizersBackend`, the chat template only in `chat_template.jinja` (TGI's router never reads it), the
  extra special tokens as a list `extra_special_tokens` (4.5x fails to load the tokenizer), no
  `added_tokens_decoder`, and Gemma's activation only as `hidden_activation`. We add the older spellings next
  to the new ones (`rope_theta`, `rope_scaling`, `partial_rotary_factor`, `torch_dtype`,
  `PreTrainedTokenizerFast`, `chat_template`, `additional_special_tokens` and `added_tokens_decoder` in
  tokenizer_config.json, `hidden_act`); an older reader that missed `rope_theta` would silently run with
  10000 and produce garbage. `align.export.serving` then checks the folder against what vLLM's and TGI's
  loaders read for its family, before any weights are loaded back.
- The directory is verified the way a user would load it: offline, by path, in the stored dtype; the
  tokenizer must give the same ids and template, the logits (or reward scores) must match the source
  within that dtype's tolerance, and a greedy generation must run with the saved generation config.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from align.errors import ExportError
from align.export.gguf import tokenizer_round_trip
from align.export.parity import Sample, compare, describe, model_outputs
from align.export.serving import check_serving
from align.models.stop_tokens import stop_token_ids

log = logging.getLogger(__name__)

HF_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"f32": "fp32", "float32": "fp32", "f16": "fp16", "float16": "fp16", "bfloat16": "bf16"}
GENERATION_PROMPT = "What is 12 + 7?"


def hf_dtype(name: str) -> str:
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in HF_DTYPES:
        raise ExportError(f"--dtype {name}: HF export writes {', '.join(HF_DTYPES)} weights (for a quantized file "
                          "use --format gguf --dtype q8_0)")
    return key


def write_hf(model, tokenizer, folder: Path, dtype: str, task: str) -> None:
    """Save weights (safetensors), config, generation config and tokenizer with its chat template."""
    model = model.to(HF_DTYPES[hf_dtype(dtype)])
    if task == "causal":
        gen = model.generation_config
        stops = stop_token_ids(tokenizer, gen.eos_token_id)
        gen.eos_token_id = stops if len(stops) > 1 else stops[0]
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        if tokenizer.bos_token_id is not None:
            gen.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    _add_legacy_spellings(folder, dtype)


def _add_legacy_spellings(folder: Path, dtype: str) -> None:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("torch_dtype", str(HF_DTYPES[hf_dtype(dtype)]).removeprefix("torch."))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            config.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items()
                                               if k not in ("rope_theta", "partial_rotary_factor")})
    if "hidden_activation" in config:  # Gemma: vLLM's Gemma 2 code wants both names, equal
        config.setdefault("hidden_act", config["hidden_activation"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    for machine_specific in ("is_local", "local_files_only"):  # how this machine loaded it, not a setting
        tok_config.pop(machine_specific, None)
    if tok_config.get("tokenizer_class") == "TokenizersBackend" and (folder / "tokenizer.json").is_file():
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = folder / "chat_template.jinja"
    if template.is_file():
        tok_config.setdefault("chat_template", template.read_text())
    if isinstance(tok_config.get("extra_special_tokens"), list):  # 4.x wants a dict here, or fails to load
        tok_config.setdefault("additional_special_tokens", tok_config.pop("extra_special_tokens"))
    if "added_tokens_decoder" not in tok_config and (folder / "tokenizer.json").is_file():
        tok_config["added_tokens_decoder"] = _added_tokens_decoder(folder / "tokenizer.json")
    tok_path.write_text(json.dumps(tok_config, indent=2) + "\n")


def _added_tokens_decoder(tokenizer_json: Path) -> dict:
    """tokenizer.json's added tokens in tokenizer_config.json's 4.x form (transformers 5 no longer writes it)."""
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    added = json.loads(tokenizer_json.read_text()).get("added_tokens") or []
    return {str(token["id"]): {k: token[k] for k in fields if k in token} for token in added}


@contextmanager
def offline():
    """No hub access while verifying: the directory must be complete on its own."""
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def verify_hf(folder: Path, tokenizer, samples: list[Sample], reference: list[torch.Tensor], dtype: str,
              task: str, pooling: str = "last") -> dict:
    """Reload `folder` offline and check tokenizer, outputs and (for an LM) a greedy generation."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    dtype = hf_dtype(dtype)
    auto = AutoModelForSequenceClassification if task == "classifier" else AutoModelForCausalLM
    with offline():
        loaded_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        serving = check_serving(folder, loaded_tok) if task == "causal" else None
        model = auto.from_pretrained(str(folder), local_files_only=True, dtype=HF_DTYPES[dtype])
    model.eval()
    tokens = tokenizer_round_trip(tokenizer, loaded_tok, samples)
    if not tokens["passed"]:
        raise ExportError(f"{folder.name}: the exported tokenizer differs: {tokens['problem']}")
    if task == "classifier":
        model.reward_pooling = pooling
    figures = compare(reference, model_outputs(model, samples, task), dtype)
    log.info("HF directory reloaded vs source: %s", describe(figures))
    if not figures["passed"]:
        raise ExportError(f"{folder.name}: outputs after reloading differ from the source: {describe(figures)}")
    result = {"parity": figures, "tokenizer": tokens, **({"serving": serving} if serving else {})}
    if task == "causal":
        result["generation"] = check_generation(model, loaded_tok)
    return result


def check_generation(model, tokenizer, max_new_tokens: int = 32) -> dict:
    """Greedy generation with the saved generation config; its EOS ids must include the turn's end token."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    end = stop_token_ids(tokenizer)
    if not set(end) <= set(eos):
        raise ExportError(f"generation_config.eos_token_id {eos} misses the end-of-turn ids {end}: generation "
                          "would not stop at the end of an answer")
    ids = prompt_ids(tokenizer, GENERATION_PROMPT)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(ids):].tolist()
    return {"prompt": GENERATION_PROMPT, "text": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": len(new), "stopped_at_eos": bool(new) and new[-1] in eos, "eos_token_id": eos}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A user prompt in the chat template with the assistant turn opened (plain text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]
