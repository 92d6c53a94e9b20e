"""The model-family matrix: Llama 3, Qwen2, Qwen3, Gemma 2, Mistral and Phi-3, each a tiny random model of the
real transformers class with its family's tokenizer quirks and chat template (`align.models.families`).

For each family: labels cover exactly each answer and the template's end-of-turn token (never an EOS the
template does not write), prompts end with the assistant header and hold one BOS, generation stops at the
family's end of turn; one recipe (LoRA SFT, reward, DPO, PPO with RLOO, full SFT) trains every stage; the LoRA
SFT entry merges and exports to an HF folder whose logits match the unmerged adapter and whose generation
config stops at the end of turn; each exports to GGUF in llama.cpp's layout for it and reloads as its own class,
and what llama.cpp would run differently is refused from config.json, before weights load. Then the family
fixes on their own: the system prompt folded for a template without a system role, templates that render
the last answer differently, and Gemma 2's logit softcapping in align's own LM-head projection.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from align.config.loading import validate_recipe
from align.config.schema import GenerationSettings
from align.data.tokenize import IGNORE, encode_conversation, encode_prompt, render
from align.errors import ExportError
from align.models.families import (
    FAMILIES,
    family,
    make_family_model,
    make_family_tokenizer,
    save_family_model,
)
from align.models.stop_tokens import stop_token_ids, template_end_token_id
from align.pipeline.run import run_recipe
from align.registry.store import Registry
from tests.conftest import write_jsonl

SINGLE = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7"}]
MULTI = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7"},
         {"role": "user", "content": "Please write a short poem."}, {"role": "assistant", "content": "The sea is blue."}]
SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}, *SINGLE]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI, "system": SYSTEM}

# What each family's template writes for an answer (`last`: the conversation's last message), end of turn included.
ANSWER = {
    "llama3": lambda text, last: text.strip() + "<|eot_id|>",
    "qwen2": lambda text, last: text + "<|im_end|>",
    "qwen3": lambda text, last: ("<think>\n\n</think>\n\n" if last else "") + text.strip() + "<|im_end|>",
    "gemma2": lambda text, last: text.strip() + "<end_of_turn>",
    "mistral": lambda text, last: " " + text + "</s>",
    "phi3": lambda text, last: text + "<|end|>",
}
HEADER = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "qwen2": "<|im_start|>assistant\n",
          "qwen3": "<|im_start|>assistant\n", "gemma2": "<start_of_turn>model\n", "mistral": "[/INST]",
          "phi3": "<|assistant|>\n"}
# config.json settings llama.cpp would run differently than transformers, and the reason the refusal names.
GGUF_REFUSED = {
    # as Phi-3-mini-4k's window of 2047 in a context of 4096
    "phi3": ({"sliding_window": 256},
             "sliding-window attention (a window of 256 tokens in a context of 512) is not applied by llama.cpp's phi3"),
    "gemma2": ({"tie_word_embeddings": False}, "its LM head is not tied to the embeddings"),
}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: make_family_tokenizer(name) for name in FAMILIES}


def labelled(encoded) -> list[int]:
    return [t for t in encoded.labels if t != IGNORE]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------ tokenizer, template


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("which", CONVERSATIONS)
def test_labels_are_each_answer_and_the_end_of_turn(tokenizers, name, which):
    tokenizer, messages = tokenizers[name], CONVERSATIONS[which]
    encoded = encode_conversation(tokenizer, messages, max_length=None)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    expected = [t for i in answers for t in ids(tokenizer, ANSWER[name](messages[i]["content"], i == len(messages) - 1))]
    assert labelled(encoded) == expected
    # The sequence is the template's text, token for token: no EOS added where the template ends turns otherwise.
    assert encoded.input_ids == ids(tokenizer, render(tokenizer, messages))
    bos = tokenizer.bos_token_id
    if family(name).prepends_bos:
        assert encoded.input_ids[0] == bos and encoded.input_ids.count(bos) == 1
    end = tokenizer.convert_tokens_to_ids(family(name).end_of_turn)
    assert labelled(encoded).count(end) == len(answers)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("which", CONVERSATIONS)
def test_prompt_ends_with_the_assistant_header_and_prefixes_the_conversation(tokenizers, name, which):
    tokenizer, messages = tokenizers[name], CONVERSATIONS[which]
    prompt = encode_prompt(tokenizer, messages[:-1])
    assert tokenizer.decode(prompt).endswith(HEADER[name])
    if family(name).prepends_bos:
        assert prompt[0] == tokenizer.bos_token_id and prompt.count(tokenizer.bos_token_id) == 1
    encoded = encode_conversation(tokenizer, messages, max_length=None)
    assert encoded.input_ids[: len(prompt)] == prompt
    assert encoded.labels[len(prompt) - 1] == IGNORE and encoded.labels[len(prompt)] != IGNORE


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_stops_at_the_familys_end_of_turn(tokenizers, name):
    """The template's end-of-turn id is found, listed with the EOS, and both of align's decoders stop on it
    (the model's head is pushed towards it); where it is not the EOS (Gemma, Phi-3, Qwen2 base) they used
    to run to max_new_tokens."""
    from align.models.generation import generate
    from align.rl.sampler import sample

    tokenizer = tokenizers[name]
    end = tokenizer.convert_tokens_to_ids(family(name).end_of_turn)
    assert template_end_token_id(tokenizer) == end
    assert stop_token_ids(tokenizer) == list(dict.fromkeys([end, tokenizer.eos_token_id]))
    if tokenizer.pad_token is None:
        tokenizer = make_family_tokenizer(name)
        tokenizer.pad_token = tokenizer.eos_token  # as the stages set it
    model = make_family_model(name, tokenizer).eval()
    steps = []

    def towards_end(module, args, out):  # the end of turn on the third generated token
        steps.append(1)
        if len(steps) >= 3:
            out = out.clone()
            out[..., end] += 100.0
        return out

    model.get_output_embeddings().register_forward_hook(towards_end)
    prompts = [encode_prompt(tokenizer, SINGLE[:1])]
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0)
    for decoder in (generate, sample):
        steps.clear()
        response = decoder(model, tokenizer, prompts, settings)[0]
        assert response.token_ids[-1] == end and len(response.token_ids) == 3, decoder.__name__
        assert response.ended_with_eos and family(name).end_of_turn not in response.text


# ------------------------------------------------------------------------------------------ every stage


SFT_ROWS = [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]}
            for a, b in [(3, 4), (1, 2), (5, 6), (7, 1)]]
PAIRS = [{"prompt": f"Question {i}: can you help?", "chosen": "Sure, here is some help.", "rejected": "No. Go away."}
         for i in range(8)]
PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(3) for b in range(3)]
COMMON = {"batch_size": 4, "logging_steps": 1, "save_steps": 100, "scheduler": "constant",
          "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
STAGES = ("sft", "reward", "dpo", "ppo", "full")


def family_recipe(folder, base, name: str):
    data, prefs = write_jsonl(folder / "sft.jsonl", SFT_ROWS), write_jsonl(folder / "prefs.jsonl", PAIRS)
    prompts = write_jsonl(folder / "prompts.jsonl", PROMPTS)
    return validate_recipe({"name": name, "base": str(base), "stages": {
        "sft": {"data": str(data), **COMMON, "max_steps": 8, "lr": 1e-2, "eval_split": 0.0},
        "reward": {"from": "base", "data": str(prefs), **COMMON, "max_steps": 2, "lr": 1e-3, "eval_split": 0.25},
        "dpo": {"from": "sft", "data": str(prefs), **COMMON, "max_steps": 2, "lr": 1e-3, "eval_split": 0.25},
        # An "e" in the answer: about half of a random model's answers have one, so few groups score alike.
        "ppo": {"from": "sft", "prompts": str(prompts), **COMMON, "estimator": "rloo", "samples_per_prompt": 4,
                "rollout_batch": 8, "minibatch": 8, "max_steps": 2, "lr": 1e-3, "eval_split": 0.1, "eval_limit": 1,
                "rewards": [{"checker": "regex", "args": {"pattern": "e"}}],
                "generation": {"max_new_tokens": 6, "temperature": 1.0}, "kl": {"coef": 0.01, "penalty": "loss"}},
        "full": {"kind": "sft", "from": "base", "method": "full", "data": str(data), **COMMON, "max_steps": 2,
                 "lr": 1e-3, "eval_split": 0.0},
    }, "eval": {"metrics": ["loss"]}}, [], source=str(folder / "r.yaml"))


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory):
    """One recipe run per family; its LoRA SFT entry merged (registered) and exported to an HF folder (merged
    again on the way, checked against the unmerged adapter)."""
    from align.export import export_model
    from align.export.merge import merge

    name = request.param
    folder = tmp_path_factory.mktemp(f"family-{name}")
    base = save_family_model(folder / "base", name)
    registry = Registry(folder / "registry")
    entries = run_recipe(family_recipe(folder, base, name), registry, runs_root=folder / "runs")
    merged = merge(entries["sft"].ref, registry)  # `align merge`
    report = export_model(entries["sft"].ref, registry, "hf", out=folder / "hf")  # `align export --format hf`
    return {"name": name, "base": base, "registry": registry, "entries": entries, "merged": merged,
            "export": report, "folder": folder}


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_every_stage_registers_an_entry_with_finite_losses_and_moved_weights(trained):
    name, entries, registry = trained["name"], trained["entries"], trained["registry"]
    assert set(entries) == set(STAGES)
    for stage in STAGES:
        entry = entries[stage]
        assert registry.resolve(f"{name}/{stage}").ref == entry.ref
        key = "policy_loss" if stage == "ppo" else "loss"
        losses = [h[key] for h in entry.manifest["history"] if key in h]
        assert losses and all(math.isfinite(x) for x in losses), (stage, losses)
    base = _weights(trained["base"] / "model.safetensors")
    for stage in ("sft", "reward", "dpo", "ppo"):  # every LoRA B matrix starts at zero: all have moved
        adapter = _weights(entries[stage].file("adapter", "adapter_model.safetensors"))
        moved = [k for k, v in adapter.items() if "lora_B" in k and v.abs().max() > 0]
        assert moved and len(moved) == sum("lora_B" in k for k in adapter), stage
    assert any(h["trained_share"] > 0 for h in entries["ppo"].manifest["history"])
    full = _weights(entries["full"].file("model", "model.safetensors"))
    unchanged = [k for k, v in full.items() if k in base and torch.equal(v, base[k])]
    assert not unchanged, unchanged
    # The pad token a family lacks (Llama 3, Mistral) is the EOS in every entry's tokenizer.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(entries["sft"].file("tokenizer"))
    assert tokenizer.pad_token is not None
    if family(name).special["pad_token"] is None:
        assert tokenizer.pad_token == tokenizer.eos_token


def test_lora_sft_loss_goes_down(trained):
    losses = [h["loss"] for h in trained["entries"]["sft"].manifest["history"] if "loss" in h]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < losses[0] - 0.2, losses


def test_merged_export_matches_the_unmerged_adapter_and_stops_at_the_end_of_turn(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.export.parity import model_outputs, sample_inputs

    name, folder, report = trained["name"], trained["folder"] / "hf", trained["export"]
    merge_parity = trained["merged"].manifest["merge"]["parity_vs_adapter"]
    for figures in (merge_parity, report["merge"]["parity_vs_adapter"], report["verification"]["parity"]):
        assert figures["passed"] and figures["max_abs_diff"] <= figures["tolerance"] < 1e-3
        assert figures["top1_agreement"] == 1.0
    tokenizer = AutoTokenizer.from_pretrained(folder)
    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(exported).__name__ == family(name).model_class
    base = AutoModelForCausalLM.from_pretrained(trained["base"], dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, str(trained["entries"]["sft"].file("adapter")))
    samples = sample_inputs(tokenizer)
    diffs = [float((a - b).abs().max()) for a, b in zip(model_outputs(exported, samples), model_outputs(adapter, samples))]
    assert max(diffs) < 1e-4
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    eos = [eos] if isinstance(eos, int) else eos
    end = tokenizer.convert_tokens_to_ids(family(name).end_of_turn)
    assert eos[0] == end and tokenizer.eos_token_id in eos
    # What vLLM and TGI read is there (align.export.serving): the check ran in the export and passes again.
    from align.export.serving import serving_findings

    serving = report["verification"]["serving"]
    assert serving["passed"] and serving["architectures"] == [family(name).model_class]
    assert serving_findings(folder, end, tokenizer.eos_token_id) == []


@pytest.mark.parametrize("name", GGUF_REFUSED)
def test_gguf_export_refuses_what_llama_cpp_would_run_differently_before_loading_weights(name, tmp_path, monkeypatch):
    """From config.json, before an adapter is merged: an adapter entry (its chain walked down to the base
    folder) and, for Phi-3 (whose fused projections the shared test adapter does not target), the folder."""
    from align.export import command
    from tests.tiny_entries import register_adapter

    registry = Registry(tmp_path / "registry")
    base = save_family_model(tmp_path / "base", name)
    ref = str(base) if name == "phi3" else register_adapter(registry, base, name=f"{name}/sft").ref
    changes, reason = GGUF_REFUSED[name]
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **changes}))
    monkeypatch.setattr(command, "load_source", lambda *a, **k: pytest.fail("weights loaded before refusing"))
    with pytest.raises(ExportError) as info:
        command.export_model(ref, registry, "gguf", out=tmp_path / "gguf")
    message = str(info.value)
    assert family(name).model_class in message and reason in message and "--format hf" in message
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_exports_to_gguf_and_reloads_as_its_class_with_the_same_logits(name, tmp_path):
    from align.export import command

    base = save_family_model(tmp_path / "base", name)
    report = command.export_model(str(base), Registry(tmp_path / "registry"), "gguf", "f16", out=tmp_path / "gguf")
    parity = report["verification"]["parity"]
    assert parity["passed"] and parity["top1_agreement"] == 1.0 and report["verification"]["tokenizer"]["passed"]
    # Mistral is written as llama.cpp's `llama` (its decoder is Llama's) and so reloads as Llama
    assert report["verification"]["reloaded_as"] == ("LlamaForCausalLM" if name == "mistral" else family(name).model_class)


def test_a_sliding_window_shorter_than_the_context_is_refused_for_gguf(tmp_path):
    from align.export.gguf import check_supported
    from align.models.families import make_family_model, make_family_tokenizer

    model = make_family_model("mistral", make_family_tokenizer("mistral"))
    model.config.sliding_window = 128  # the context is 512
    with pytest.raises(ExportError, match="sliding-window attention .*128.* 512"):
        check_supported(model)


# ------------------------------------------------------------------------------------------ the fixes


def test_a_template_without_a_system_role_gets_the_system_prompt_in_the_first_user_turn(tokenizers):
    """Gemma 2's template raises on a system message; align folds it into the first user turn (as Gemma 3's
    template does) instead of failing the row. A template with a system role renders it as its own turn."""
    gemma = tokenizers["gemma2"]
    with pytest.raises(Exception, match="System role not supported"):
        gemma.apply_chat_template(SYSTEM, tokenize=False)
    text = render(gemma, SYSTEM)
    assert text == render(gemma, [{"role": "user", "content": "You are a helpful assistant.\n\nWhat is 3 + 4?"},
                                  SINGLE[1]])
    assert "<start_of_turn>user\nYou are a helpful assistant.\n\nWhat is 3 + 4?<end_of_turn>" in text
    assert tokenizers["llama3"].apply_chat_template(SYSTEM, tokenize=False) == render(tokenizers["llama3"], SYSTEM)


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_a_template_that_renders_the_last_answer_differently_still_labels_every_turn(tokenizers, name):
    """Qwen3 writes an empty <think> block before the last answer only, Phi-3 an EOS after the last turn: the
    conversation rendered through an earlier answer is not a prefix of the whole, which used to refuse every
    multi-turn row as "not prefix-stable". Each turn is now found in the full rendering."""
    tokenizer = tokenizers[name]
    through_first = render(tokenizer, MULTI[:2])
    assert not render(tokenizer, MULTI).startswith(through_first)
    encoded = encode_conversation(tokenizer, MULTI, max_length=None)
    assert tokenizer.decode(labelled(encoded)) == ANSWER[name]("3 + 4 = 7", False) + ANSWER[name]("The sea is blue.", True)


def test_align_log_probs_carry_gemma2s_logit_softcapping(tokenizers):
    """align projects the LM head itself (labelled positions only); Gemma 2's forward caps the logits after the
    head (`cap * tanh(logits / cap)`), so the stages' log-probs must too, or SFT, DPO and PPO would train
    logits the model never produces. With a tight cap the two differ by far more than rounding."""
    from align.models.logprobs import sequence_logps, token_logps

    tokenizer = tokenizers["gemma2"]
    model = make_family_model("gemma2", tokenizer).eval()
    model.config.final_logit_softcapping = 0.5
    encoded = encode_conversation(tokenizer, SINGLE, max_length=None)
    input_ids, labels = torch.tensor([encoded.input_ids]), torch.tensor([encoded.labels])
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits[0, :-1]
        assert float(logits.abs().max()) <= 0.5
        scored = labels[0, 1:] != IGNORE
        expected = torch.log_softmax(logits.float(), -1)[scored].gather(1, labels[0, 1:][scored][:, None]).squeeze(1)
        total, count = sequence_logps(model, input_ids, mask, labels)
        per_token = token_logps(model, input_ids, mask, labels)["logps"][0][scored]
    assert int(count) == int(scored.sum())
    assert float(total) == pytest.approx(float(expected.sum()), abs=1e-4)
    assert torch.allclose(per_token, expected, atol=1e-5)
