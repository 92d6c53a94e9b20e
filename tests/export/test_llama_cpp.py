"""GGUF exports run in llama.cpp (`align check-export`): the real consumer reads the file as transformers
computes the fp32 model: the same prompt ids, the same next-token choices, the same greedy answer, and a stop
at the end-of-turn token. Runs where llama-cpp-python is installed (`pip install "align[llama-cpp]"`, a
build from source of several minutes, so CI leaves it out); skipped, saying so, elsewhere."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llama_cpp", reason='llama-cpp-python is not installed (pip install "align[llama-cpp]")')

from align.export.llama_cpp import check_export, table  # noqa: E402
from align.models.families import save_family_model  # noqa: E402
from align.models.tiny import save_tiny_model  # noqa: E402
from align.registry.store import Registry  # noqa: E402
from tests.export.test_gguf_vocab import vocab_file  # noqa: E402


def _stopping_model(folder, make):
    """A tiny model whose end-of-turn token wins at every position of the check prompts, so both programs
    must stop at it at once (a weight edit, so the GGUF file carries the behaviour): the token's output row
    gains a large multiple of the mean final hidden state, on which every position projects positively.
    Tied embeddings are untied first where the layout writes a separate head; Gemma 2's cannot be (llama.cpp
    projects with the embeddings), so its tied row changes, which is its input embedding too: harmless, as
    its EOS appears in none of the prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.export.gguf_layouts import LAYOUTS
    from align.export.llama_cpp import CHECK_CHATS, prompt_ids

    make(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    with torch.no_grad():
        hidden = torch.cat([model(input_ids=torch.tensor([prompt_ids(tokenizer, chat)[1]]),
                                  output_hidden_states=True).hidden_states[-1][0] for chat in CHECK_CHATS])
        direction = hidden.mean(0)
        assert float((hidden @ direction).min()) > 0
        if model.config.tie_word_embeddings and not LAYOUTS[model.config.model_type].separate_head:
            assert not any(end in prompt_ids(tokenizer, chat)[1] for chat in CHECK_CHATS)
        elif model.config.tie_word_embeddings:  # untie, so only the output row changes
            model.config.tie_word_embeddings = False
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.lm_head.weight[end] += 400 * direction / direction.norm() ** 2
    model.save_pretrained(folder)
    return folder


def _fitted(folder, steps: int = 20):
    """The model at `folder` after a few steps of fitting the check prompts themselves. A random tiny model's
    next-token logits are nearly flat (Gemma 2's span 0.7), so wherever two tokens are within rounding of
    each other q8_0 picks either (seed 0's Gemma 2: 10% of positions); a fitted model has the margins of a
    trained one, so top-1 agreement measures the layout, not the dice. The logit gap is what bounds error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.export.llama_cpp import CHECK_CHATS, prompt_ids

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    sequences = [torch.tensor([prompt_ids(tokenizer, chat)[1]]) for chat in CHECK_CHATS]
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = sum(model(input_ids=ids, labels=ids).loss for ids in sequences) / len(sequences)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return folder


# The default model's layout (a ChatML Llama) and every family with a GGUF layout.
FAMILIES = ["chatml", "llama3", "qwen2", "qwen3", "gemma2", "mistral", "phi3"]


def _make(family):
    return (lambda f: save_tiny_model(f, hidden=64)) if family == "chatml" else \
        (lambda f: save_family_model(f, family))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_gguf_dtype_runs_in_llama_cpp_as_the_fp32_model_computes(family, tmp_path):
    folder = tmp_path / family
    _make(family)(folder)
    _fitted(folder)
    results = check_export(str(folder), Registry(tmp_path / "registry"), ["f16", "q8_0"], tmp_path / "c.json")
    assert [r["dtype"] for r in results] == ["f16", "q8_0"]
    for r in results:
        assert r["tokens_match"], r["rows"]
        assert r["top1_agreement"] >= 0.95, r
        assert r["max_logit_gap"] < (0.01 if r["dtype"] == "f16" else 0.1) * max(r["logit_scale"], 1.0), r
        assert r["passed"]
    # f16: every greedy answer transformers' own, or parted where the fp32 model's top two are within the
    # logit gap of each other (a near tie that rounding decides: 6e-5 apart in the fitted ChatML model)
    assert results[0]["greedy_match"] + results[0]["greedy_near_ties"] / results[0]["prompts"] == 1.0, \
        results[0]["rows"]
    assert "| f16 |" in table(results) and (tmp_path / "c.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_stops_where_transformers_stops(family, tmp_path):
    folder = _stopping_model(tmp_path / family, _make(family))
    [r] = check_export(str(folder), Registry(tmp_path / "registry"), ["f16"])
    assert all(row["hf_stopped"] for row in r["rows"]), r["rows"]
    assert r["stops_at_end_of_turn"] is True and r["ends_generation"] == {"end_of_turn": True, "eos": True} and r["passed"]


# ------------------------------------------------------------------ the vocabulary alone, in llama.cpp's reader

VOCAB_TEXTS = ["12345 and 678", "Hello  world,\n\nnew  lines\n", "café 日本", "don't, we'll", " leading space",
               "tabs\tand\r\nreturns"]
VOCAB_ARCH = {"chatml": "llama", "llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
              "mistral": "llama", "phi3": "phi3"}


def _llama_cpp_ids(path):
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return lambda text, add_bos=False: vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenizes_each_family_s_vocabulary_as_transformers(family, tmp_path):
    """Digits, runs of spaces and newlines, non-ASCII, contractions: the same ids in llama.cpp as in
    transformers, plain, after a special token and in a chat prompt. One known difference: Mistral's
    tokenizer (transformers' legacy=False) puts a ▁ before a plain text's first word, which llama.cpp cannot,
    so llama.cpp reads that text as if it began with a space."""
    from align.data.tokenize import adds_bos
    from align.export.gguf_vocab_spm import space_prefix
    from align.models.families import make_family_tokenizer
    from align.models.tiny import make_tokenizer

    tokenizer = make_tokenizer() if family == "chatml" else make_family_tokenizer(family)
    cpp = _llama_cpp_ids(vocab_file(tmp_path / "v.gguf", tokenizer, VOCAB_ARCH[family], family))
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    first_only = bool(spec["model"].get("byte_fallback")) and space_prefix(spec)[1] is not None
    assert first_only == (family == "mistral")

    def hf(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Don't: 12345 + 7 = café?"}], tokenize=False,
                                         add_generation_prompt=True)
    for text in VOCAB_TEXTS:
        as_read = " " + text if first_only and not text.startswith(" ") else text
        assert cpp(as_read) == hf(text), text
        assert cpp(tokenizer.eos_token + text) == hf(tokenizer.eos_token + text), text
    assert cpp(chat) == hf(chat)
    assert (cpp("a", add_bos=True)[:1] == [tokenizer.bos_token_id]) == adds_bos(tokenizer)


def test_llama_cpp_strips_after_phi3_s_special_tokens_as_transformers_when_the_tokenizer_does(tmp_path):
    from align.models.family_templates import PHI3
    from tests.export.test_gguf_vocab import phi3_with_rstrip

    tokenizer = phi3_with_rstrip({"<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "</s>"})
    tokenizer.chat_template = PHI3
    cpp = _llama_cpp_ids(vocab_file(tmp_path / "p.gguf", tokenizer, "phi3", "my-sft"))  # named "... (phi3)"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"},
                                          {"role": "assistant", "content": "19"}], tokenize=False)
    assert cpp(chat) == tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert "\n" in chat and tokenizer.convert_tokens_to_ids("<0x0A>") not in cpp(chat)  # the newlines stripped


# ------------------------------------------------------------- scaled RoPE: Llama 3.1's llama3, and linear

_STORY = ("The quick brown fox jumps over the lazy dog. Hello there, how can I help you today? "
          "Good answers are helpful, honest and harmless. ")
# 150 to 236 tokens each: scaling slows the slow rotary pairs, which short prompts barely turn (on the check
# prompts, 22 to 53 tokens, removing llama3's factors moves the fitted model's logits by 0.43, on these by 2.9)
LONG_CHATS = [
    [{"role": "user", "content": _STORY * 4 + "What is 12 + 7?"}],
    [{"role": "system", "content": "You are a helpful assistant. " * 3},
     {"role": "user", "content": "Please write a short poem about the sea. " * 5 + "12345 + 67890 = 80235. " * 3}],
    [{"role": "user", "content": " ".join(f"{a} + {b} = {a + b}." for a in range(1, 9) for b in (3, 4, 5))}],
]


@torch.no_grad()
def _plain_rope_gap(folder) -> tuple[float, float]:
    """The source model against the same weights with plain RoPE on LONG_CHATS: (largest logit gap, top-1
    agreement), what a file without (or with wrong) scaling would show at best."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from align.export.llama_cpp import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(folder)
    scaled = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder)
    config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    plain = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32)
    gaps, agree = [], []
    for chat in LONG_CHATS:
        ids = torch.tensor([prompt_ids(tokenizer, chat)[1]])
        a, b = scaled(input_ids=ids).logits[0], plain(input_ids=ids).logits[0]
        gaps.append(float((a - b).abs().max()))
        agree.append(float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    return max(gaps), sum(agree) / len(agree)


@pytest.mark.parametrize("rope", ["llama3", "linear"])
def test_scaled_rope_runs_in_llama_cpp_as_transformers_computes_it(rope, tmp_path, monkeypatch):
    """Llama 3.1's `llama3` scaling (llama.cpp's rope_freqs) and linear scaling (its rope.scaling.factor), on
    prompts long enough that the scaling matters: llama.cpp's logits are the fp32 model's within the f16 and
    q8_0 tolerances, while the same weights with the factors removed are visibly off."""
    from align.export import llama_cpp
    from tests.export.test_gguf_rope import LINEAR, LLAMA3, save_scaled_llama3

    monkeypatch.setattr(llama_cpp, "CHECK_CHATS", LONG_CHATS)  # _fitted fits these too
    # fitted longer than the families' models: 20 steps leave attention nearly blind to position (plain RoPE
    # moved the logits by 0.05 of 4), 60 make it depend on where each token is
    folder = _fitted(save_scaled_llama3(tmp_path / rope, {"llama3": LLAMA3, "linear": LINEAR}[rope]), steps=60)
    results = check_export(str(folder), Registry(tmp_path / "registry"), ["f16", "q8_0"])
    removed_gap, removed_top1 = _plain_rope_gap(folder)
    for r in results:
        assert r["tokens_match"] and r["passed"], r
        assert r["top1_agreement"] >= 0.95, r
        assert r["max_logit_gap"] < (0.01 if r["dtype"] == "f16" else 0.1) * max(r["logit_scale"], 1.0), r
    f16 = results[0]
    assert f16["greedy_match"] + f16["greedy_near_ties"] / f16["prompts"] == 1.0, f16["rows"]
    # without the factors the logits move beyond both tolerances above (llama3: 2.9 of a scale of 8.7, where
    # llama.cpp's f16 file is 0.0045 off), so a missing or wrong rope_freqs fails this test; the top-1 choice
    # mostly survives (98%), which is why the gap is what is checked
    assert removed_gap > 0.2 * f16["logit_scale"] and removed_gap > 100 * f16["max_logit_gap"], removed_gap
    assert removed_top1 < 1.0
