"""Tiny random-weight models of the families users fine-tune most, for tests that no family quirk escapes.

Each is built from the real transformers config and model classes (Llama, Qwen2, Qwen3, Gemma 2, Mistral,
Phi-3), so attention biases, q/k norms, logit softcapping, fused projections and tied or untied embeddings
run the same code as the real models; only the sizes are tiny (hidden 64, 2 blocks), so each training step
takes milliseconds. The tokenizer is trained in milliseconds in its family's shape
(`align.models.family_tokenizers`), with the family's special tokens and its chat template
(`align.models.family_templates`), and its tokenizer-level quirks kept:

| family | tokenizer | BOS | EOS | end of turn | pad | written by the template |
|---|---|---|---|---|---|---|
| llama3 | byte-level, Llama 3 split | `<|begin_of_text|>`, added | `<|eot_id|>` | `<|eot_id|>` | none | BOS |
| qwen2 | byte-level, Qwen2 split, NFC | none | `<|endoftext|>` | `<|im_end|>` | `<|endoftext|>` | a default system prompt |
| qwen3 | byte-level, Qwen2 split, NFC | none | `<|im_end|>` | `<|im_end|>` | `<|endoftext|>` | an empty `<think>` block |
| gemma2 | SentencePiece-style, no `▁` prefix | `<bos>`, added | `<eos>` | `<end_of_turn>` | `<pad>` | BOS; no system role |
| mistral | SentencePiece-style, `▁` prefix first | `<s>`, added | `</s>` | `</s>` | none | BOS |
| phi3 | SentencePiece-style, no `▁` prefix | `<s>` | `<|endoftext|>` | `<|end|>` | `<|endoftext|>` | EOS after the last turn |

("added": the tokenizer prepends it when asked for special tokens, as the real one does, so a careless
caller writes it twice. "`▁` prefix first": a `▁` before the first word of the text only, as transformers
loads Mistral v0.2/v0.3.) Qwen2 is the base model's tokenizer (EOS `<|endoftext|>`, the instruct one's is
`<|im_end|>`); each model's generation config holds only the tokenizer's EOS, as a base model's does, so
whatever adds the end-of-turn id is align. Simplification: the real Phi-3 tokenizer prefixes each piece of
text with `▁` and strips the whitespace after its role tokens, which makes an answer's tokens differ from
the same text tokenized alone; the tiny one adds no prefix (Gemma's rule) and strips nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from align.models import family_templates as templates
from align.models.family_tokenizers import byte_level_bpe, sentencepiece_bpe

_CORPUS = [
    "What is 12 + 7? The answer is 19.", "Hello there, how can I help you today?",
    "The quick brown fox jumps over the lazy dog.", "#### 42", "Answer: 3 + 4 = 7",
    "user assistant system model", "Please write a short poem about the sea.", "0 1 2 3 4 5 6 7 8 9 + - * / =",
    "Good answers are helpful, honest and harmless.", "I cannot help with that request.",
    "You are a helpful assistant. [INST] [/INST]", "Don't worry, it's fine: we'll see.", "12345 + 67890 = 80235",
]


@dataclass(frozen=True)
class Family:
    """What a tiny model of one family is built from."""

    name: str
    model_class: str  # transformers' causal LM class
    config_class: str
    special: dict  # bos/eos/pad/unk token texts (None: the family has none)
    extra: tuple[str, ...]  # other special tokens (turn markers)
    template: str
    end_of_turn: str
    prepends_bos: bool = False  # the tokenizer adds BOS on its own
    tied: bool = True
    config: dict = field(default_factory=dict)  # the family's own config settings
    plain_tokens: tuple[str, ...] = ()  # added, not special (Qwen3's <think>)
    pieces: str = "llama3"  # the tokenizer's shape: a byte-level style or a SentencePiece space style


FAMILY_SPECS = {
    "llama3": Family(
        "llama3", "LlamaForCausalLM", "LlamaConfig",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": None, "unk_token": None},
        ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"), templates.LLAMA3, "<|eot_id|>",
        prepends_bos=True, tied=True, config={"rope_theta": 500000.0}, pieces="llama3"),
    "qwen2": Family(
        "qwen2", "Qwen2ForCausalLM", "Qwen2Config",
        {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None},
        ("<|im_start|>", "<|im_end|>"), templates.QWEN2, "<|im_end|>", tied=True,
        config={"rope_theta": 1000000.0}, pieces="qwen2"),  # q/k/v biases: always on in Qwen2's attention
    "qwen3": Family(
        "qwen3", "Qwen3ForCausalLM", "Qwen3Config",
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None},
        ("<|endoftext|>", "<|im_start|>"), templates.QWEN3, "<|im_end|>", tied=True,
        config={"rope_theta": 1000000.0}, plain_tokens=("<think>", "</think>"), pieces="qwen2"),  # q/k RMSNorm built in
    "gemma2": Family(
        "gemma2", "Gemma2ForCausalLM", "Gemma2Config",
        {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"},
        ("<start_of_turn>", "<end_of_turn>"), templates.GEMMA2, "<end_of_turn>", prepends_bos=True, tied=True,
        config={"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16,
                "hidden_activation": "gelu_pytorch_tanh"}, pieces="replace"),
    "mistral": Family(
        "mistral", "MistralForCausalLM", "MistralConfig",
        {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": None},
        ("[INST]", "[/INST]"), templates.MISTRAL, "</s>", prepends_bos=True, tied=False,
        config={"sliding_window": 4096, "rope_theta": 1000000.0}, pieces="first"),
    "phi3": Family(
        "phi3", "Phi3ForCausalLM", "Phi3Config",
        {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), templates.PHI3, "<|end|>", tied=False,
        config={"original_max_position_embeddings": 512}, pieces="never"),  # fused qkv_proj and gate_up_proj
}
FAMILIES = tuple(FAMILY_SPECS)


def family(name: str) -> Family:
    if name not in FAMILY_SPECS:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILY_SPECS[name]


def make_family_tokenizer(name: str, vocab_size: int = 400):
    """The family's tokenizer: its shape (`Family.pieces`), special tokens, BOS behaviour and chat template.
    `vocab_size` counts a byte-level vocabulary's tokens; a SentencePiece-style one has half as many
    learned pieces, besides its 256 byte tokens."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    spec = family(name)
    special = {key: value for key, value in spec.special.items() if value is not None}
    tokens = list(dict.fromkeys([*special.values(), *spec.extra]))
    if spec.pieces in ("llama3", "qwen2"):
        bpe = byte_level_bpe(spec.pieces, _CORPUS * 3, tokens, vocab_size)
    else:
        bpe = sentencepiece_bpe(spec.pieces, _CORPUS * 3, tokens, special.get("unk_token"), vocab_size // 2)
    if spec.plain_tokens:
        bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.plain_tokens])
    if spec.prepends_bos:
        bos = special["bos_token"]
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **special)
    tokenizer.add_special_tokens({"additional_special_tokens": list(spec.extra)})
    tokenizer.chat_template = spec.template
    return tokenizer


def make_family_model(name: str, tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                      kv_heads: int = 2):
    """A random-weight model of the family's own class, sized for tests."""
    import torch
    import transformers

    spec = family(name)
    torch.manual_seed(seed)
    if name == "phi3":
        kv_heads = heads  # Phi-3-mini: one KV head per query head, in one fused qkv projection
    settings = dict(spec.config)
    theta = settings.pop("rope_theta", None)
    if theta is not None:
        settings["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    config = getattr(transformers, spec.config_class)(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=spec.tied, **settings)
    model = getattr(transformers, spec.model_class)(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # a base model's: only the tokenizer's EOS
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_family_model(folder: str | Path, family: str, seed: int = 0, **shape) -> Path:
    """Write a tiny model of `family` (one of `FAMILIES`) and its tokenizer to `folder`, a local HF directory
    usable as a recipe's `base:`."""
    folder = Path(folder)
    tokenizer = make_family_tokenizer(family)
    model = make_family_model(family, tokenizer, seed=seed, **shape)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
