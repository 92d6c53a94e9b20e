"""A SentencePiece-style BPE tokenizer (Mistral, Gemma, Phi-3) as llama.cpp's `llama` tokenizer model.

Why it is built this way:
- llama.cpp's SentencePiece tokenizer reads no merges: it cuts a piece of text into characters and keeps
  joining the adjacent pair whose joined text is a token, highest token score first (the leftmost pair on a
  tie); characters no token covers become `<0xNN>` byte tokens. transformers' BPE joins the adjacent pair
  with the best merge rank. The two cut text alike when every way of cutting a token into two tokens is a
  merge (as a SentencePiece model converts to tokenizer.json) and a token's score follows the rank of the
  first merge that makes it: score = -rank. So the scores are derived from the merges, a vocabulary whose
  merges miss cuts (one trained as plain BPE) is refused, since llama.cpp would join pairs transformers
  never joins; all 256 byte tokens must exist, as llama.cpp looks them up for byte fallback.
- Spaces: llama.cpp writes each space as `▁` and, with `add_space_prefix`, puts a `▁` before every piece of
  text that starts the text or follows a special token. A `Prepend("▁")` + `Replace(" ", "▁")` normalizer
  (Llama 2, Mistral v0.1 and Phi-3 tokenizer.json files) does exactly that; a `Replace` normalizer alone
  (Gemma) or a `Metaspace` that never prepends is `add_space_prefix=false`. A `Metaspace` that prepends only
  at the start of the whole text (transformers' LlamaTokenizer with legacy=False, how Mistral v0.2/v0.3 and
  Phi-3 load) has no GGUF equivalent: written as `false`, it matches on every text that begins with a
  special token or a space (every chat prompt of those templates) and loses the `▁` before a plain text's
  first word, which the export logs. A `Metaspace` that prepends before every piece not already starting
  with a space cannot be written either way and is refused, like any other shape.
"""

from __future__ import annotations

from align.errors import ExportError

SPACE = "▁"
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
FIRST_ONLY = ("its Metaspace adds ▁ only at the start of the whole text, which llama.cpp cannot do: the file "
              "adds none, so chat prompts (which begin with a special token) tokenize the same, but a plain "
              "text's first word loses its ▁ in llama.cpp")
HF_INSTEAD = "Export with --format hf instead"


def describe(step: dict | None) -> str:
    """A normalizer, pre-tokenizer or decoder from tokenizer.json, in a few words for an error message."""
    if not step:
        return "none"
    kind = step.get("type")
    if kind == "Sequence":
        parts = step.get("pretokenizers") or step.get("normalizers") or step.get("decoders") or []
        return "Sequence[" + ", ".join(describe(p) for p in parts) + "]"
    pattern = step.get("pattern") or {}
    shown = f"regex `{pattern['Regex']}`" if "Regex" in pattern else repr(pattern.get("String"))
    details = {
        "Split": lambda: f"{shown}, {step.get('behavior')}{', inverted' if step.get('invert') else ''}",
        "Replace": lambda: f"{shown} -> {step.get('content')!r}",
        "Prepend": lambda: repr(step.get("prepend")),
        "ByteLevel": lambda: f"add_prefix_space={step.get('add_prefix_space')}, use_regex={step.get('use_regex', True)}",
        "Digits": lambda: f"individual_digits={step.get('individual_digits')}",
        "Metaspace": lambda: f"{step.get('replacement')!r}, prepend_scheme={prepend_scheme(step)!r}, "
                             f"split={step.get('split', True)}",
    }
    return f"{kind}({details[kind]()})" if kind in details else str(kind)


def prepend_scheme(metaspace: dict) -> str:
    """A Metaspace's prepend scheme (older files say only `add_prefix_space`)."""
    return metaspace.get("prepend_scheme") or ("always" if metaspace.get("add_prefix_space", True) else "never")


def _steps(normalizer: dict | None) -> list[dict]:
    if not normalizer:
        return []
    return list(normalizer.get("normalizers", [])) if normalizer.get("type") == "Sequence" else [normalizer]


def _is_replace_space(step: dict) -> bool:
    return step.get("type") == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == SPACE


def space_prefix(spec: dict) -> tuple[bool, str | None]:
    """(`add_space_prefix`, a caveat to log or None) for the way tokenizer.json `spec` turns spaces into `▁`;
    refuses a way llama.cpp cannot reproduce."""
    steps, pre = _steps(spec.get("normalizer")), spec.get("pre_tokenizer")
    replaced = bool(steps) and _is_replace_space(steps[-1])
    # After Replace(" ", "▁") no space is left, so GemmaTokenizer's Split(" ") pre-tokenizer splits nothing.
    idle_split = (pre or {}).get("type") == "Split" and pre.get("pattern") == {"String": " "} and replaced
    if pre is None or idle_split:
        if len(steps) == 2 and steps[0] == {"type": "Prepend", "prepend": SPACE} and replaced:
            return True, None
        if len(steps) == 1 and replaced:
            return False, None
    elif pre.get("type") == "Metaspace" and not steps and pre.get("replacement") == SPACE and not pre.get("split", True):
        scheme = prepend_scheme(pre)
        if scheme == "never":
            return False, None
        if scheme == "first":
            return False, FIRST_ONLY
    raise ExportError(
        "GGUF export writes a SentencePiece-style tokenizer when it turns spaces into ▁ as llama.cpp can: a "
        "Prepend('▁') + Replace(' ', '▁') normalizer, a Replace(' ', '▁') normalizer, or a Metaspace('▁', "
        f"split=False) that prepends never or only first; this one has normalizer "
        f"{describe(spec.get('normalizer'))} and pre-tokenizer {describe(pre)}. {HF_INSTEAD}")


def merge_pairs(model: dict) -> list[tuple[str, str]]:
    """The BPE merges of a tokenizer.json model as pairs ("a b" strings or [a, b] lists)."""
    pairs = []
    for merge in model.get("merges", []):
        pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
        if len(pair) != 2:
            raise ExportError(f"merge {merge!r} is not a pair of tokens")
        pairs.append(pair)
    return pairs


def check_model(model: dict, pairs: list[tuple[str, str]], normal: set[str]) -> None:
    """Refuse a SentencePiece-style BPE llama.cpp's tokenizer would cut differently (`normal`: the texts of
    the ordinary tokens, neither special nor byte tokens)."""
    problems = []
    if model.get("ignore_merges"):
        problems.append("ignore_merges is on (a piece that is a whole token skips merging), which llama.cpp's "
                        "SentencePiece tokenizer never does")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("it marks subwords with a prefix or suffix")
    vocab = model.get("vocab") or {}
    missing = [t for t in BYTE_TOKENS if t not in vocab]
    if missing:
        problems.append(f"{len(missing)} of the 256 byte tokens are missing (first {missing[0]}), which "
                        "llama.cpp looks up for characters outside the vocabulary")
    cuts = missing_cuts(vocab, pairs, normal)
    if cuts:
        left, right = cuts[0]
        problems.append(f"merges miss {len(cuts)} cut(s) of a token into two tokens (first "
                        f"{left!r} + {right!r}): llama.cpp would join them where transformers does not (a "
                        "vocabulary trained as plain BPE, not converted from SentencePiece)")
    if problems:
        raise ExportError("GGUF export: this SentencePiece-style tokenizer cannot be written as llama.cpp's "
                          f"`llama` tokenizer: {'; '.join(problems)}. {HF_INSTEAD}")


def missing_cuts(vocab: dict, pairs: list[tuple[str, str]], normal: set[str]) -> list[tuple[str, str]]:
    """Each (left, right) of vocabulary tokens that joins into an ordinary token but is not a merge."""
    merges = set(pairs)
    return [(token[:i], token[i:]) for token in normal for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab and (token[:i], token[i:]) not in merges]


def merge_scores(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Each merged token's score: minus the rank (from 1) of the first merge that makes it, so the best merge
    scores highest; 0 is left to tokens no merge makes (characters, byte and special tokens)."""
    scores: dict[str, float] = {}
    for rank, (left, right) in enumerate(pairs, start=1):
        scores.setdefault(left + right, -float(rank))
    return scores
