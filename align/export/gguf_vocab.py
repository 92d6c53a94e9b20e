"""A BPE tokenizer as GGUF metadata: llama.cpp's `gpt2` model (byte-level) or `llama` (SentencePiece-style).

Why it is built this way:
- A GGUF file has no tokenizer.json: it carries the vocabulary as a token list indexed by id, one type per
  token (normal, control for special tokens, unknown, user-defined for plain added tokens, byte for
  SentencePiece's `<0xNN>`, unused for padding rows), the merges as "a b" strings, the special token ids,
  whether BOS/EOS are added, and the chat template. These are read off the tokenizer transformers loaded
  (its backend's JSON), so what is written is what the model was trained with.
- Byte-level BPE: the pre-tokenizer is named, not stored (`tokenizer.ggml.pre`); llama.cpp picks its
  splitting regex, normalization and merge rule by name. A shape is accepted only where the name's rules
  are the tokenizer's: plain GPT-2 byte-level (`gpt-2`), SmolLM's digits-then-byte-level (`smollm`), and
  `Split(regex, Isolated)` + `ByteLevel(use_regex=False)` with Llama 3's regex and its `ignore_merges`
  (`llama-bpe`) or Qwen2's regex, with or without its NFC normalizer (`qwen2`; llama.cpp does not
  normalize, which only matters for text that is not NFC already). Anything else is refused, naming what
  was found, rather than written with a name that would split text differently.
- SentencePiece-style BPE (byte fallback on): llama.cpp joins pieces by token score, not merge rank, and
  adds the `▁` before a word by one flag; `gguf_vocab_spm` derives the scores and the flag and refuses
  what it cannot express.
- llama.cpp strips the whitespace after special tokens only in models whose `general.name` contains "phi3"
  or "phi-3" (Phi-3's rstrip tokens). So the name decides tokenization: a tokenizer with exactly Phi-3's
  rstrip tokens gets a name that says phi3, any other loses the word from its name, and any other
  lstrip/rstrip token is refused.
"""

from __future__ import annotations

import json
import logging
import re

from align.errors import ExportError
from align.export.gguf_vocab_spm import (
    BYTE_TOKENS,
    HF_INSTEAD,
    check_model,
    describe,
    merge_pairs,
    merge_scores,
    space_prefix,
)
from align.models.family_tokenizers import LLAMA3_SPLIT, QWEN2_SPLIT

log = logging.getLogger(__name__)

SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}  # Split regex -> llama.cpp's name
IGNORES_MERGES = {"llama-bpe"}  # the names llama.cpp tokenizes with ignore_merges on (a word that is a token)
NFC_ALLOWED = {"qwen2"}
PHI3_NAME = re.compile("phi-?3", re.IGNORECASE)  # what llama.cpp looks for in general.name
PHI3_UNSTRIPPED = ("<unk>", "<s>", "<|endoftext|>")  # llama.cpp's phi-3 rule: every other special token...
PHI3_STRIPPED = ("</s>",)  # ...and these strip the whitespace after them
# How transformers' GGUF loader rebuilds a SentencePiece-style file's spaces: by architecture, whatever the
# file's add_space_prefix says (`integrations/gguf`: phi3's builder prepends, gemma's never, others first).
TRANSFORMERS_SPACES = {"phi3": "prepend", "gemma": "never", "gemma2": "never", "gemma3": "never"}
SPACE_RULES = {"prepend": "a ▁ before every piece of text", "never": "no ▁ prefix",
               "first": "a ▁ at the start of the text only"}


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the byte-level pre-tokenizer of tokenizer.json `spec`."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [p.get("type") for p in parts]
    levels = [p for p in parts if p.get("type") == "ByteLevel"]
    name, problem = None, None
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        name = "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        split = parts[0]
        name = SPLIT_NAMES.get((split.get("pattern") or {}).get("Regex"))
        if name is None:
            problem = "its Split regex is neither Llama 3's nor Qwen2's"
        elif split.get("behavior") != "Isolated" or split.get("invert"):
            name, problem = None, "its Split does not isolate the regex's matches"
    else:
        problem = "llama.cpp names no such pre-tokenizer"
    if name is not None and any(p.get("add_prefix_space") for p in levels):
        name, problem = None, "its ByteLevel adds a prefix space, which llama.cpp never does"
    normalizer = (spec.get("normalizer") or {}).get("type")
    if name is not None and normalizer is not None and not (normalizer == "NFC" and name in NFC_ALLOWED):
        name, problem = None, f"llama.cpp's {name!r} does not apply its {describe(spec.get('normalizer'))} normalizer"
    ignore = bool((spec.get("model") or {}).get("ignore_merges"))
    if name is not None and ignore != (name in IGNORES_MERGES):
        problem = (f"its ignore_merges is {'on' if ignore else 'off'}, while llama.cpp's {name!r} has it "
                   f"{'on' if name in IGNORES_MERGES else 'off'}")
        name = None
    if name is None:
        raise ExportError(f"GGUF export writes byte-level BPE pre-tokenizers llama.cpp names (GPT-2, SmolLM, "
                          f"Llama 3, Qwen2); this one is {describe(pre)}: {problem}. {HF_INSTEAD}")
    return name


def vocab_metadata(tokenizer, n_vocab: int) -> dict:
    """Everything `tokenizer.*` in the GGUF file: model, pre-tokenizer, tokens, types, scores, merges, special
    ids, flags, chat template; and whether llama.cpp must strip as Phi-3 does (`phi3_strip`)."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    if model.get("type") != "BPE" or not (sentencepiece or decoder == "ByteLevel"):
        raise ExportError(f"GGUF export writes BPE tokenizers, byte-level or SentencePiece-style (byte fallback); "
                          f"this one is {model.get('type')} with a {describe(spec.get('decoder'))} decoder and "
                          f"byte fallback {'on' if model.get('byte_fallback') else 'off'}. {HF_INSTEAD}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary has "
                          f"{n_vocab} rows")
    tokens, types = token_list(tokenizer, vocab, n_vocab, sentencepiece)
    pairs = merge_pairs(model)
    if any(" " in part for pair in pairs for part in pair):
        raise ExportError("a merge holds a token with a space, which a GGUF file's 'a b' merges cannot spell")
    metadata = {"model": "gpt2", "pre": None, "scores": None, "add_space_prefix": None}
    if sentencepiece:
        check_model(model, pairs, {t for t, k in zip(tokens, types) if k == TokenType.NORMAL})
        prefix, caveat = space_prefix(spec)
        if caveat:
            log.warning("GGUF export of this tokenizer: %s", caveat)
        scores = merge_scores(pairs)
        metadata.update(model="llama", pre="default", add_space_prefix=prefix,
                        scores=[scores.get(t, 0.0) if k == TokenType.NORMAL else 0.0 for t, k in zip(tokens, types)])
    else:
        metadata["pre"] = pre_tokenizer_name(spec)
    probe = tokenizer("a")["input_ids"]
    metadata.update({
        "tokens": tokens,
        "types": [int(t) for t in types],
        "merges": [" ".join(pair) for pair in pairs],
        "ids": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
                "pad": tokenizer.pad_token_id},
        "add_bos": bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
        "add_eos": bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
        "phi3_strip": phi3_strip(tokenizer, tokens, types),
    })
    return metadata


def token_list(tokenizer, vocab: dict, n_vocab: int, sentencepiece: bool) -> tuple[list[str], list]:
    """Every row's token text and `gguf.TokenType` (`vocab`: the tokenizer's token -> id); rows the tokenizer
    has no token for are unused."""
    from gguf import TokenType

    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    bytes_ = set(BYTE_TOKENS) if sentencepiece else set()
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            if not added[i].special:
                types.append(TokenType.USER_DEFINED)
            else:
                types.append(TokenType.UNKNOWN if sentencepiece and i == tokenizer.unk_token_id else TokenType.CONTROL)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.BYTE if by_id[i] in bytes_ else TokenType.NORMAL)
    return tokens, types


def phi3_strip(tokenizer, tokens: list[str], types: list) -> bool:
    """Whether the tokenizer strips whitespace after its special tokens as llama.cpp does for a model named
    phi3 (True), or after none (False); refuses any other lstrip/rstrip."""
    from gguf import TokenType

    added = tokenizer.added_tokens_decoder
    rstrip = {i for i, token in added.items() if token.rstrip}
    lstrip = sorted(token.content for token in added.values() if token.lstrip)
    if not rstrip and not lstrip:
        return False
    ids = {t: i for i, t in enumerate(tokens)}
    special = {i for i, k in enumerate(types) if k in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)}
    phi3 = (special - {ids.get(t) for t in PHI3_UNSTRIPPED}) | {ids.get(t) for t in PHI3_STRIPPED}
    if not lstrip and rstrip == phi3 and all(t in ids for t in (*PHI3_UNSTRIPPED, *PHI3_STRIPPED)):
        return True
    named = sorted(tokens[i] for i in rstrip)
    raise ExportError(f"GGUF export: this tokenizer strips whitespace around special tokens (rstrip: "
                      f"{named or 'none'}; lstrip: {lstrip or 'none'}), which llama.cpp does only for Phi-3's "
                      f"tokens in a model named phi3. {HF_INSTEAD}")


def llama_cpp_name(name: str, strip: bool) -> str:
    """`name` as `general.name`: saying phi3 exactly when llama.cpp must strip as it does for Phi-3."""
    if bool(PHI3_NAME.search(name)) == strip:
        return name
    if strip:
        return f"{name} (phi3)" if name else "phi3"
    return PHI3_NAME.sub(lambda m: m.group(0)[:3] + "_3", name)


def add_vocab(writer, metadata: dict, name: str) -> None:
    """Write `vocab_metadata` through a `gguf.GGUFWriter`, with `name` as `general.name` in the spelling the
    tokenizer needs there (`llama_cpp_name`: llama.cpp's Phi-3 strip rule keys on it)."""
    wanted = llama_cpp_name(name, metadata["phi3_strip"])
    if wanted != name:
        log.info("GGUF general.name %r written as %r: llama.cpp strips whitespace after special tokens exactly "
                 "in models named phi3, and this tokenizer %s", name, wanted,
                 "does" if metadata["phi3_strip"] else "does not")
    if wanted:
        writer.add_name(wanted)
    writer.add_tokenizer_model(metadata["model"])
    writer.add_tokenizer_pre(metadata["pre"])
    writer.add_token_list(metadata["tokens"])
    writer.add_token_types(metadata["types"])
    if metadata["scores"] is not None:
        writer.add_token_scores(metadata["scores"])
    writer.add_token_merges(metadata["merges"])
    ids = metadata["ids"]
    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if ids[kind] is not None:
            add(ids[kind])
    writer.add_add_bos_token(metadata["add_bos"])
    writer.add_add_eos_token(metadata["add_eos"])
    if metadata["add_space_prefix"] is not None:
        writer.add_add_space_prefix(metadata["add_space_prefix"])
    if metadata["chat_template"]:
        writer.add_chat_template(metadata["chat_template"])


def transformers_reload_caveat(architecture: str, tokenizer) -> str | None:
    """Why transformers' GGUF loader cannot give back `tokenizer`'s ids from a file of llama.cpp architecture
    `architecture` ("llama", "phi3", ...), or None when it can. It rebuilds a SentencePiece-style
    tokenizer's `▁` prefix from the architecture alone, so a Phi-3 tokenizer without Phi-3's prefix, or a
    Mistral one with Llama 2's, comes back cutting text differently although llama.cpp reads the file right."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if not (spec.get("model") or {}).get("byte_fallback"):
        return None
    prefix, first_only = space_prefix(spec)
    ours = "first" if first_only else "prepend" if prefix else "never"
    theirs = TRANSFORMERS_SPACES.get(architecture, "first")
    if ours == theirs:
        return None
    return (f"transformers' GGUF loader rebuilds a {architecture} file's SentencePiece tokenizer with "
            f"{SPACE_RULES[theirs]}, whatever the file says; this tokenizer has {SPACE_RULES[ours]}")
