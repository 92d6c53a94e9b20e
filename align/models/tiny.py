"""Tiny models built from a config with random weights, for tests and for benchmarks without real weights.

Nothing here downloads: the tokenizer is a byte-level BPE trained in milliseconds on a small corpus, with
real special tokens and a real chat template (ChatML like SmolLM2, where pad == EOS; or a Llama-2 style
template that writes its own BOS), so label masking and template checks run against the same code paths
as real models.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '<<SYS>>' + message['content'] + '<</SYS>>' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2}

_CORPUS = [
    "What is 12 + 7? The answer is 19.", "Hello there, how can I help you today?",
    "The quick brown fox jumps over the lazy dog.", "#### 42", "Answer: 3 + 4 = 7",
    "user assistant system", "Please write a short poem about the sea.", "0 1 2 3 4 5 6 7 8 9 + - * / =",
    "Good answers are helpful, honest and harmless.", "I cannot help with that request.",
]


def make_tokenizer(template: str = "chatml", vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if template == "chatml":
        special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                   "unk_token": "<|endoftext|>"}
    else:
        special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    tokens = list(dict.fromkeys(special.values()))
    bpe = Tokenizer(models.BPE(unk_token=special["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **special)
    tokenizer.chat_template = TEMPLATES[template]
    return tokenizer


def make_model(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(folder: str | Path, template: str = "chatml", seed: int = 0, **shape) -> Path:
    """Write a tiny model and its tokenizer to `folder` as a local HF directory (usable as a recipe base)."""
    folder = Path(folder)
    tokenizer = make_tokenizer(template)
    model = make_model(tokenizer, seed=seed, **shape)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
