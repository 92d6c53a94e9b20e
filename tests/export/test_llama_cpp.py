"""GGUF exports run in llama.cpp (`align check-export`): the real consumer reads the file as transformers
computes the fp32 model: the same prompt ids, the same next-token choices, the same greedy answer, and a stop
at the end-of-turn token. Runs where llama-cpp-python is installed (`pip install "align[llama-cpp]"`, a
build from source of several minutes, so CI leaves it out); skipped, saying so, elsewhere."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llama_cpp", reason='llama-cpp-python is not installed (pip install "align[llama-cpp]")')

from align.export.llama_cpp import check_export, table  # noqa: E402
from align.models.families import save_family_model  # noqa: E402
from align.models.tiny import save_tiny_model  # noqa: E402
from align.registry.store import Registry  # noqa: E402


def _stopping_model(folder, make):
    """A tiny model whose end-of-turn token wins at every position of the check prompts, so both programs
    must stop at it at once (a weight edit, so the GGUF file carries the behaviour): the token's output row
    gains a large multiple of the mean final hidden state, on which every position projects positively."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        if model.config.tie_word_embeddings:  # untie, so only the output row changes
            model.config.tie_word_embeddings = False
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.lm_head.weight[end] += 400 * direction / direction.norm() ** 2
    model.save_pretrained(folder)
    return folder


FAMILIES = ["chatml", "llama3", "mistral"]  # the llama-layout ones: the default model's and two families'


def _make(family):
    return (lambda f: save_tiny_model(f, hidden=64)) if family == "chatml" else \
        (lambda f: save_family_model(f, family))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_gguf_dtype_runs_in_llama_cpp_as_the_fp32_model_computes(family, tmp_path):
    folder = tmp_path / family
    _make(family)(folder)
    results = check_export(str(folder), Registry(tmp_path / "registry"), ["f16", "q8_0"], tmp_path / "c.json")
    assert [r["dtype"] for r in results] == ["f16", "q8_0"]
    for r in results:
        assert r["tokens_match"], r["rows"]
        assert r["top1_agreement"] >= 0.95 and r["max_logit_gap"] < 0.1 * max(r["logit_scale"], 1.0), r
        assert r["passed"]
    assert results[0]["greedy_match"] == 1.0  # f16: every greedy answer the same as transformers'
    assert "| f16 |" in table(results) and (tmp_path / "c.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_stops_where_transformers_stops(family, tmp_path):
    folder = _stopping_model(tmp_path / family, _make(family))
    [r] = check_export(str(folder), Registry(tmp_path / "registry"), ["f16"])
    assert all(row["hf_stopped"] for row in r["rows"]), r["rows"]
    assert r["stops_at_end_of_turn"] is True and r["ends_generation"] == {"end_of_turn": True, "eos": True} and r["passed"]
