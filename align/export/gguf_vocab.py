"""A byte-level BPE tokenizer as GGUF metadata (llama.cpp's `gpt2` tokenizer model).

Why it is built this way:
- A GGUF file has no tokenizer.json: it carries the vocabulary as a token list indexed by id, one type per
  token (normal, control for special tokens, user-defined for plain added tokens, unused for padding
  rows), the merges as "a b" strings, the special token ids, whether BOS/EOS are added, and the chat
  template. These are read off the tokenizer transformers loaded (its backend's JSON), so what is written
  is what the model was trained with.
- The pre-tokenizer is named, not stored: llama.cpp picks its splitting regex by name. Only shapes we can
  name exactly are accepted (plain GPT-2 byte-level; SmolLM's digits-then-byte-level); anything else is
  refused rather than written with a name that would split text differently.
"""

from __future__ import annotations

import json

from align.errors import ExportError


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the pre-tokenizer in a tokenizer.json `spec`."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    raise ExportError(f"GGUF export supports byte-level BPE tokenizers with a GPT-2 style pre-tokenizer; this "
                      f"one has {kinds or 'none'}. Export with --format hf instead")


def vocab_metadata(tokenizer, n_vocab: int) -> dict:
    """Everything `tokenizer.*` in the GGUF file: tokens, types, merges, special ids, flags, chat template."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers; this one is "
                          f"{model.get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder. "
                          "Export with --format hf instead")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary has "
                          f"{n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = []
    for merge in model.get("merges", []):
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in part for part in pair):
            raise ExportError(f"merge {merge!r} cannot be written as 'a b' in a GGUF file")
        merges.append(" ".join(pair))
    probe = tokenizer("a")["input_ids"]
    return {
        "model": "gpt2",
        "pre": pre_tokenizer_name(spec),
        "tokens": tokens,
        "types": [int(t) for t in types],
        "merges": merges,
        "ids": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
                "pad": tokenizer.pad_token_id},
        "add_bos": bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
        "add_eos": bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def add_vocab(writer, metadata: dict) -> None:
    """Write `vocab_metadata` through a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model(metadata["model"])
    writer.add_tokenizer_pre(metadata["pre"])
    writer.add_token_list(metadata["tokens"])
    writer.add_token_types(metadata["types"])
    writer.add_token_merges(metadata["merges"])
    ids = metadata["ids"]
    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if ids[kind] is not None:
            add(ids[kind])
    writer.add_add_bos_token(metadata["add_bos"])
    writer.add_add_eos_token(metadata["add_eos"])
    if metadata["chat_template"]:
        writer.add_chat_template(metadata["chat_template"])
