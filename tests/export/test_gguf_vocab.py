"""GGUF vocabularies as llama.cpp reads them, without llama.cpp: which byte-level pre-tokenizers get which
llama.cpp name (the real families' shapes; a changed regex refused by name), the SentencePiece-style
scores and token types on a hand-built tokenizer, llama.cpp's score-driven SentencePiece algorithm (written
out here) reproducing transformers' ids on the families' tokenizers, the Phi-3 strip rule and the name that
carries it, and a round trip through transformers' GGUF tokenizer loader where it can rebuild the file."""

from __future__ import annotations

import json
from itertools import pairwise

import gguf
import pytest
from tokenizers import AddedToken, Tokenizer, models, normalizers
from transformers import (
    AutoTokenizer,
    GemmaTokenizer,
    LlamaTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
)

from align.errors import ExportError
from align.export.gguf_vocab import (
    add_vocab,
    llama_cpp_name,
    pre_tokenizer_name,
    transformers_reload_caveat,
    vocab_metadata,
)
from align.export.gguf_vocab_spm import (
    FIRST_ONLY,
    check_model,
    merge_pairs,
    space_prefix,
)
from align.models.families import FAMILIES, make_family_tokenizer
from align.models.tiny import make_tokenizer

TEXTS = ["12345 and 7", "Hello  world, the answer is 19.", "café 日本", "don't stop", " leading space",
         "What is 3 + 4?\nIt is 7."]
# The pre-tokenizer of Meta-Llama-3-8B's tokenizer.json, as published.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_spec(regex: str = LLAMA3_REGEX, ignore_merges: bool = True, normalizer=None) -> dict:
    return {"normalizer": normalizer, "model": {"type": "BPE", "ignore_merges": ignore_merges},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}


def spec_of(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


@pytest.fixture(scope="module")
def families():
    return {name: make_family_tokenizer(name) for name in FAMILIES}


# --------------------------------------------------------------------------------- byte-level: llama.cpp names


def test_the_real_families_pre_tokenizers_get_llama_cpp_s_names():
    assert pre_tokenizer_name(llama3_spec()) == "llama-bpe"
    assert pre_tokenizer_name(spec_of(Qwen2Tokenizer())) == "qwen2"  # transformers' own Qwen2 shape, NFC and all
    assert pre_tokenizer_name(spec_of(make_tokenizer())) == "gpt-2"
    smollm = {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "add_prefix_space": False}]}}
    assert pre_tokenizer_name(smollm) == "smollm"


@pytest.mark.parametrize("spec, named", [
    (llama3_spec(LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}{1,4}")), r"\p{N}{1,4}"),
    (llama3_spec(ignore_merges=False), "ignore_merges is off, while llama.cpp's 'llama-bpe' has it on"),
    (llama3_spec(normalizer={"type": "NFC"}), "NFC"),
    ({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}, "prefix space"),
    ({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Whitespace"}}, "Whitespace"),
])
def test_a_changed_pre_tokenizer_is_refused_naming_what_was_found(spec, named):
    with pytest.raises(ExportError, match="byte-level BPE pre-tokenizers") as err:
        pre_tokenizer_name(spec)
    assert named in str(err.value)


def test_each_family_tokenizer_is_written_as_its_real_family_s_kind(families):
    written = {name: (m["model"], m["pre"], m["add_space_prefix"])
               for name, m in ((n, vocab_metadata(t, len(t))) for n, t in families.items())}
    assert written == {"llama3": ("gpt2", "llama-bpe", None), "qwen2": ("gpt2", "qwen2", None),
                       "qwen3": ("gpt2", "qwen2", None), "gemma2": ("llama", "default", False),
                       "mistral": ("llama", "default", False), "phi3": ("llama", "default", False)}


def test_a_unigram_tokenizer_is_refused_by_kind():
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0))
    with pytest.raises(ExportError, match="this one is Unigram"):
        vocab_metadata(PreTrainedTokenizerFast(tokenizer_object=unigram, unk_token="<unk>"), 2)


# ------------------------------------------------------------------------- SentencePiece-style: spaces, scores


def test_each_way_of_writing_spaces_gets_its_llama_cpp_flag_or_is_refused():
    assert space_prefix(spec_of(GemmaTokenizer())) == (False, None)
    assert space_prefix(spec_of(LlamaTokenizer())) == (False, FIRST_ONLY)  # legacy=False: Mistral v0.2/v0.3
    legacy = {"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None}
    assert space_prefix(legacy) == (True, None)  # Llama 2, Mistral v0.1, Phi-3 tokenizer.json
    with pytest.raises(ExportError, match="prepend_scheme='always'"):
        space_prefix(spec_of(LlamaTokenizer(legacy=True)))


def hand_built(merges):
    """`<unk> <s> </s>`, the byte tokens, `▁ a b ab ▁a ▁ab`, Llama 2's Prepend + Replace normalizer."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "a", "b", "ab", "▁a", "▁ab"]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_scores_follow_the_first_merge_of_each_token_and_types_are_sentencepiece_s():
    merges = [("a", "b"), ("▁", "a"), ("▁a", "b"), ("▁", "ab")]
    metadata = vocab_metadata(hand_built(merges), 266)
    scores = dict(zip(metadata["tokens"], metadata["scores"]))
    assert {t: scores[t] for t in ("ab", "▁a", "▁ab", "▁", "a", "<s>", "<0x41>")} == \
        {"ab": -1.0, "▁a": -2.0, "▁ab": -3.0, "▁": 0.0, "a": 0.0, "<s>": 0.0, "<0x41>": 0.0}
    types = dict(zip(metadata["tokens"], metadata["types"]))
    assert [types[t] for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>", "▁ab")] == [2, 3, 3, 6, 6, 1]
    assert metadata["tokens"][-1] == "[PAD265]" and metadata["types"][-1] == 5  # a padding row: unused
    assert metadata["merges"] == ["a b", "▁ a", "▁a b", "▁ ab"] and metadata["add_space_prefix"] is True


def test_a_vocabulary_whose_merges_miss_a_cut_is_refused():
    tokenizer = hand_built([("a", "b"), ("▁", "a"), ("▁a", "b")])  # "▁" + "ab" also makes "▁ab"
    with pytest.raises(ExportError, match=r"merges miss 1 cut\(s\) of a token into two tokens \(first '▁' \+ 'ab'\)"):
        vocab_metadata(tokenizer, 265)
    model = spec_of(tokenizer)["model"]
    del model["vocab"]["<0x41>"]
    with pytest.raises(ExportError, match="1 of the 256 byte tokens are missing"):
        check_model(model, merge_pairs(model), set())


def llama_cpp_sentencepiece(text: str, tokens: list[str], scores: list[float], prefix: bool) -> list[int]:
    """llama.cpp's SentencePiece tokenization of one piece of text (llm_tokenizer_spm): spaces as ▁, then
    keep joining the adjacent pair that makes the highest-scoring token (the leftmost on a tie); a symbol
    that is no token becomes its UTF-8 bytes' `<0xNN>` tokens."""
    ids = {t: i for i, t in enumerate(tokens)}
    symbols = list(((" " if prefix else "") + text).replace(" ", "▁"))
    while True:
        pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(pairwise(symbols)) if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [j for s in symbols for j in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]


@pytest.mark.parametrize("name", ["gemma2", "mistral", "phi3"])
def test_llama_cpp_s_score_order_cuts_text_as_transformers_merge_order(families, name):
    tokenizer = families[name]
    metadata = vocab_metadata(tokenizer, len(tokenizer))
    for text in TEXTS:
        first_word_prefix = name == "mistral" and not text.startswith(" ")  # transformers' prefix at the start
        assert llama_cpp_sentencepiece(text, metadata["tokens"], metadata["scores"], first_word_prefix) == \
            tokenizer(text, add_special_tokens=False)["input_ids"], text


# ------------------------------------------------------------------------------------ Phi-3's strip rule, name


def phi3_with_rstrip(stripped: set[str]):
    base = make_family_tokenizer("phi3")
    base.add_special_tokens({"additional_special_tokens": ["</s>"]}, replace_extra_special_tokens=False)
    spec = spec_of(base)
    for token in spec["added_tokens"]:
        token["rstrip"] = token["content"] in stripped
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="<|endoftext|>", unk_token="<unk>")


def test_phi3_s_rstrip_tokens_are_written_for_llama_cpp_s_phi3_rule_and_others_refused():
    phi3 = {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "</s>"}
    assert vocab_metadata(tokenizer := phi3_with_rstrip(phi3), len(tokenizer))["phi3_strip"] is True
    with pytest.raises(ExportError, match=r"rstrip: \['<\|end\|>'\]"):
        vocab_metadata(tokenizer := phi3_with_rstrip({"<|end|>"}), len(tokenizer))
    assert llama_cpp_name("my-sft-v1", True) == "my-sft-v1 (phi3)" and llama_cpp_name("", True) == "phi3"
    assert llama_cpp_name("Phi-3-mini-sft", False) == "Phi_3-mini-sft" and llama_cpp_name("phi3", False) == "phi_3"
    assert llama_cpp_name("phi3-sft", True) == "phi3-sft" and llama_cpp_name("qwen2", False) == "qwen2"


# ------------------------------------------------------------------------ transformers' GGUF tokenizer loader


def vocab_file(path, tokenizer, arch: str, name: str):
    """A GGUF file of llama.cpp architecture `arch` with the tokenizer and nothing else (llama.cpp opens it
    with `vocab_only`; transformers' GGUF loader reads its tokenizer)."""
    writer = gguf.GGUFWriter(str(path), arch)
    add_vocab(writer, vocab_metadata(tokenizer, len(tokenizer)), name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name, arch", [("mistral", "llama"), ("gemma2", "gemma2"), ("llama3", "llama"),
                                        ("qwen2", "qwen2")])
def test_the_vocabulary_reloads_in_transformers_with_the_same_ids(families, tmp_path, name, arch):
    tokenizer = families[name]
    vocab_file(tmp_path / "v.gguf", tokenizer, arch, name)
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="v.gguf")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Don't: 12345 café"}], tokenize=False,
                                         add_generation_prompt=True)
    for text in [*TEXTS, chat]:
        assert back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert transformers_reload_caveat(arch, tokenizer) is None


def test_where_transformers_rebuilds_the_spaces_otherwise_it_is_said_and_true(families, tmp_path):
    tokenizer = families["phi3"]  # no ▁ prefix; transformers gives every phi3 file Phi-3's own Prepend
    path = vocab_file(tmp_path / "p.gguf", tokenizer, "phi3", "phi3")
    name = gguf.GGUFReader(str(path)).fields["general.name"].contents()
    assert name == "phi_3"  # no rstrip tokens: not llama.cpp's phi3 rule
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="p.gguf")
    assert back("12345", add_special_tokens=False)["input_ids"] != tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert "a ▁ before every piece of text" in transformers_reload_caveat("phi3", tokenizer)
