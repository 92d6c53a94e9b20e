"""The tiny families' tokenizers, shaped as each real family's tokenizer.json is (trained in milliseconds).

Why it is built this way:
- What decides how text is cut, and so whether llama.cpp reproduces transformers' ids after a GGUF export,
  is the tokenizer's shape, not its size: the pre-tokenizer's split regex, the normalizer, whether spaces
  become `▁`, byte fallback. So each tiny tokenizer has its family's shape and only the vocabulary is small.
- Byte-level BPE (Llama 3, Qwen2, Qwen3): `Split(regex, Isolated)` then `ByteLevel(use_regex=False)`, with
  the family's published regex (Llama 3 groups digits in threes, Qwen2 splits single digits), Qwen's NFC
  normalizer, and Llama 3's `ignore_merges` (a word that is a whole token is not merged up again).
- SentencePiece-style BPE (Mistral, Gemma 2, Phi-3): `▁` for spaces, all 256 `<0x00>`..`<0xFF>` byte tokens
  for characters outside the vocabulary (byte fallback), a Replace/ByteFallback/Fuse decoder. The vocabulary
  is trained on `▁`-prefixed words (SentencePiece's whitespace split) and its merges are written as a
  SentencePiece model converts to tokenizer.json: every way of cutting a token into two tokens, in the
  token's order, so that merging the best-ranked pair (transformers) and merging into the best-scoring
  token (sentencepiece, llama.cpp) cut text alike. How the `▁` before the first word is added is the
  family's (`SPACES`).
"""

from __future__ import annotations

import json

# The split regexes of the real tokenizer.json files (Meta-Llama-3-8B, Qwen2.5-0.5B).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL = {  # style -> (split regex, NFC normalizer, ignore_merges)
    "llama3": (LLAMA3_SPLIT, False, True),
    "qwen2": (QWEN2_SPLIT, True, False),
}
# style -> how `▁` reaches the first word of a piece of text (a piece: the text between special tokens)
SPACES = {
    "first": "Metaspace(prepend_scheme='first'): only at the start of the whole text (transformers' "
             "LlamaTokenizer with legacy=False, as Mistral v0.2/v0.3 load)",
    "replace": "a Replace(' ', '▁') normalizer: never (Gemma)",
    "never": "Metaspace(prepend_scheme='never'): never",
}


def byte_level_bpe(style: str, corpus: list[str], specials: list[str], vocab_size: int):
    """A byte-level BPE with the pre-tokenizer, normalizer and merge rule of `style` (`BYTE_LEVEL`)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    split, nfc, ignore_merges = BYTE_LEVEL[style]
    bpe = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer=trainer)
    return bpe


def sentencepiece_bpe(style: str, corpus: list[str], specials: list[str], unk: str | None, pieces: int):
    """A SentencePiece-style BPE: `specials`, the 256 byte tokens, then `pieces` learned pieces (characters
    first, then merges in the order they were learned), spaces as `▁` per `style` (`SPACES`)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    words = Tokenizer(models.BPE())
    words.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    words.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=pieces, show_progress=False))
    learned = json.loads(words.to_str())["model"]["vocab"]
    order = [*specials, *(f"<0x{b:02X}>" for b in range(256)), *sorted(learned, key=learned.get)]
    vocab = {token: i for i, token in enumerate(order)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=all_splits(list(learned), vocab), unk_token=unk,
                               byte_fallback=True, fuse_unk=True))
    if style == "first":
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    elif style == "never":
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    elif style == "replace":
        bpe.normalizer = normalizers.Replace(" ", "▁")
    else:
        raise KeyError(f"unknown SentencePiece space style {style!r}; known: {', '.join(SPACES)}")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    bpe.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if style == "first" else []))
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return bpe


def all_splits(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) pair of `pieces` that joins into a piece, ordered by the joined piece's id, then
    the parts' ids: the merges a SentencePiece BPE model converts to."""
    known = set(pieces)
    merges = []
    for piece in sorted(known, key=vocab.get):
        cuts = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in known and piece[i:] in known]
        merges.extend(sorted(cuts, key=lambda pair: (vocab[pair[0]], vocab[pair[1]])))
    return merges
