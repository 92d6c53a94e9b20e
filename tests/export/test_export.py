"""`align.export` on tiny adapter entries: the HF directory reloads offline with its chat template and an EOS
that stops generation; the GGUF file reloads through transformers' GGUF loader with the same tokenizer ids
and matching logits (f32 tight, q8_0 loose); q/k rows are in llama.cpp's order; a failed verification
leaves nothing behind; what GGUF cannot carry is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from align.cli.main import main
from align.errors import ExportError
from align.export import export_model
from align.export.gguf import interleave_rotary
from align.export.parity import TOLERANCES, model_outputs, sample_inputs
from align.registry.store import Registry
from align.models.stop_tokens import stop_token_ids, template_end_token_id
from align.models.tiny import make_tokenizer
from tests.tiny_entries import register_adapter, unmerged


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base):
    """One registry with a policy adapter entry and a reward adapter entry, and the policy's reference
    outputs (the unmerged adapter, fp32) on the parity samples."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("export")
    registry = Registry(root / "registry")
    policy = register_adapter(registry, tiny_base)
    reward = register_adapter(registry, tiny_base, name="tiny/reward", kind="reward")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    samples = sample_inputs(tokenizer)
    return {"root": root, "registry": registry, "policy": policy, "reward": reward, "tokenizer": tokenizer,
            "samples": samples, "reference": model_outputs(unmerged(policy), samples)}


def _max_diff(got, want) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want))


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_hf_export_reloads_offline_with_chat_template_and_eos(setup, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = setup["root"] / "hf"
    report = export_model(setup["policy"].ref, setup["registry"], "hf", out=out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "export.json"} <= names
    assert not any("adapter" in name for name in names) and not _leftovers(out.parent)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert tokenizer.chat_template == setup["tokenizer"].chat_template
    assert [tokenizer(s.text, add_special_tokens=False)["input_ids"] for s in setup["samples"]] == \
        [s.ids for s in setup["samples"]]
    assert _max_diff(model_outputs(model, setup["samples"]), setup["reference"]) < 1e-4

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert im_end in ([eos] if isinstance(eos, int) else eos)
    # Older readers (vLLM on transformers 4.x) find RoPE theta, dtype and tokenizer class where they look.
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] and config["torch_dtype"] == "float32"
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["chat_template"] == setup["tokenizer"].chat_template

    saved = json.loads((out / "export.json").read_text())
    assert saved["source"]["ref"] == setup["policy"].ref and saved["base"] == setup["policy"].manifest["base"]
    assert saved["tokenizer"]["chat_template_hash"] == setup["policy"].manifest["tokenizer"]["chat_template_hash"]
    assert saved["merge"]["parity_vs_adapter"]["passed"] and saved["verification"]["parity"]["passed"]
    assert report["verification"]["generation"]["new_tokens"] > 0


def test_generation_of_the_hf_export_stops_at_the_end_of_turn(tmp_path):
    """A ChatML model whose EOS is `<|endoftext|>` (as in many) ends its turns with `<|im_end|>`. Forced to
    write `<|im_end|>` as its third token, the export stops there (its generation config lists it), where
    the source model runs on to max_new_tokens."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                              LogitsProcessorList)

    from align.models.tiny import save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(base)
    generation = GenerationConfig.from_pretrained(base)
    generation.eos_token_id = tokenizer.eos_token_id
    generation.save_pretrained(base)
    registry = Registry(tmp_path / "registry")
    entry = register_adapter(registry, base)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])

    class EndAtThirdToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            new = input_ids.shape[1] - ids.shape[1]
            scores[:, im_end] = float("inf") if new == 2 else float("-inf")
            return scores

    def generate(folder) -> list[int]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        out_ids = model.generate(ids, max_new_tokens=20, do_sample=False,
                                 logits_processor=LogitsProcessorList([EndAtThirdToken()]))
        return out_ids[0, ids.shape[1]:].tolist()

    export_model(entry.ref, registry, "hf", out=tmp_path / "hf")
    new = generate(tmp_path / "hf")
    assert len(new) == 3 and new[-1] == im_end
    assert len(generate(base)) == 20  # the source's own config knows only <|endoftext|>


def test_stop_ids_include_the_template_end_when_eos_differs():
    tokenizer = make_tokenizer("chatml")
    tokenizer.eos_token = "<|endoftext|>"  # as in ChatML models whose EOS is not the end-of-turn token
    im_end, eot = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert template_end_token_id(tokenizer) == im_end
    assert stop_token_ids(tokenizer) == [im_end, eot]
    llama2 = make_tokenizer("llama2")
    assert stop_token_ids(llama2) == [llama2.convert_tokens_to_ids("</s>")]


def test_hf_export_of_a_reward_entry_keeps_its_scores(setup, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from align.rewards.scoring import score_sequences

    monkeypatch.setenv("ALIGN_BF16_INFERENCE", "0")
    out = setup["root"] / "reward-hf"
    report = export_model(setup["reward"].ref, setup["registry"], "hf", out=out)
    assert report["task"] == "classifier" and not (out / "generation_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    sequences = [s.ids for s in setup["samples"]]
    pad = setup["tokenizer"].pad_token_id
    want = score_sequences(unmerged(setup["reward"]), sequences, pad)
    assert max(abs(a - b) for a, b in zip(score_sequences(model, sequences, pad), want)) < 1e-4


def test_a_full_weights_entry_exports_against_its_own_outputs(setup):
    from align.export.merge import merge

    merged = merge(setup["policy"].ref, setup["registry"], name="tiny/full")
    out = setup["root"] / "full-bf16"
    report = export_model(merged.ref, setup["registry"], "hf", dtype="bf16", out=out)
    assert report["merge"] is None and report["reference"] == "the source weights (fp32)"
    assert report["source"] == {"ref": merged.ref, "lineage": {"source": "registry", "ref": merged.ref},
                                "kind": "policy", "artifact": "full"}
    parity = report["verification"]["parity"]
    assert parity["precision"] == "bf16" and 0 < parity["max_abs_diff"] <= parity["tolerance"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tokenizer, model


def test_gguf_round_trip_f32_tight_and_q8_0_loose(setup):
    sizes, diffs = {}, {}
    for dtype in ("f32", "q8_0"):
        out = setup["root"] / f"gguf-{dtype}"
        report = export_model(setup["policy"].ref, setup["registry"], "gguf", dtype=dtype, out=out)
        path = out / f"tiny-sft-v1-{dtype}.gguf"
        assert report["verification"]["parity"]["passed"] and not _leftovers(out.parent)
        _, model = _load_gguf(path)
        diffs[dtype] = _max_diff(model_outputs(model, setup["samples"]), setup["reference"])
        sizes[dtype] = path.stat().st_size
        assert report["files"][path.name] == sizes[dtype]
    scale = max(float(r.abs().max()) for r in setup["reference"])
    assert diffs["f32"] < 1e-4
    assert 1e-4 < diffs["q8_0"] < 0.1 * scale  # rounding shows, but the model is the same
    assert sizes["q8_0"] < 0.5 * sizes["f32"]


def test_gguf_tokenizer_round_trip_and_metadata(setup):
    from gguf import GGUFReader, TokenType

    out = setup["root"] / "gguf-tok"
    export_model(setup["policy"].ref, setup["registry"], "gguf", dtype="f16", out=out)
    path = out / "tiny-sft-v1-f16.gguf"
    tokenizer, _ = _load_gguf(path)
    source = setup["tokenizer"]
    for text in [s.text for s in setup["samples"]] + ["<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n", "  x\n\n"]:
        want = source(text, add_special_tokens=False)["input_ids"]
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == want
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == \
        (source.bos_token_id, source.eos_token_id, source.pad_token_id)
    assert tokenizer.chat_template == source.chat_template

    reader = GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert tokens[source.eos_token_id] == "<|im_end|>" and types[source.eos_token_id] == TokenType.CONTROL
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) == \
        len(json.loads(source.backend_tokenizer.to_str())["model"]["merges"])


def test_gguf_q_and_k_rows_are_in_llama_cpp_order(setup, tiny_base):
    from gguf import GGUFReader

    out = setup["root"] / "gguf-perm"
    export_model(setup["policy"].ref, setup["registry"], "gguf", dtype="f32", out=out)
    tensors = {t.name: np.array(t.data) for t in GGUFReader(out / "tiny-sft-v1-f32.gguf").tensors}
    merged = unmerged(setup["policy"]).merge_and_unload()
    config = merged.config
    attn = merged.model.layers[0].self_attn
    q, k = attn.q_proj.weight.detach().numpy(), attn.k_proj.weight.detach().numpy()
    assert np.allclose(tensors["blk.0.attn_q.weight"], interleave_rotary(q, config.num_attention_heads), atol=1e-6)
    assert np.allclose(tensors["blk.0.attn_k.weight"], interleave_rotary(k, config.num_key_value_heads), atol=1e-6)
    assert not np.allclose(tensors["blk.0.attn_q.weight"], q)
    assert "output.weight" not in tensors  # tied embeddings: no separate LM head


def test_failed_verification_leaves_nothing(setup, monkeypatch):
    out = setup["root"] / "never"
    monkeypatch.setitem(TOLERANCES, "q8_0", (-1.0, 0.0))
    with pytest.raises(ExportError, match="logits after reloading the GGUF file differ"):
        export_model(setup["policy"].ref, setup["registry"], "gguf", dtype="q8_0", out=out)
    assert not out.exists() and not _leftovers(out.parent)


def test_an_existing_export_is_replaced_only_with_force(setup):
    out = setup["root"] / "twice"
    export_model(setup["policy"].ref, setup["registry"], "gguf", dtype="q8_0", out=out)
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_model(setup["policy"].ref, setup["registry"], "gguf", dtype="q8_0", out=out)
    (out / "stale.txt").write_text("from before")
    export_model(setup["policy"].ref, setup["registry"], "gguf", dtype="f16", out=out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "tiny-sft-v1-f16.gguf"]
    assert not _leftovers(out.parent)


@pytest.mark.parametrize("content", ["user files", "a foreign export.json", "a file"])
def test_force_replaces_only_an_earlier_export(setup, content):
    """`--force` must not delete a folder align did not write (a typo in --out could name any folder)."""
    out = setup["root"] / f"mine-{content.replace(' ', '-')}"
    if content == "a file":
        out.write_text("notes")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        if content == "a foreign export.json":
            (out / "export.json").write_text(json.dumps({"name": "someone else's"}))
    with pytest.raises(ExportError, match="--force replaces only an earlier export"):
        export_model(setup["policy"].ref, setup["registry"], "gguf", dtype="q8_0", out=out, force=True)
    assert out.read_text() == "notes" if content == "a file" else (out / "notes.txt").read_text() == "keep me"
    assert not _leftovers(out.parent)


def test_force_replaces_an_empty_folder(setup):
    out = setup["root"] / "empty"
    out.mkdir()
    export_model(setup["policy"].ref, setup["registry"], "gguf", dtype="q8_0", out=out, force=True)
    assert (out / "export.json").is_file()


def test_gguf_refuses_a_reward_model_and_unknown_dtypes(setup):
    with pytest.raises(ExportError, match="reward model; GGUF export writes causal LMs.*--format hf"):
        export_model(setup["reward"].ref, setup["registry"], "gguf")
    with pytest.raises(ExportError, match="GGUF export writes f32, f16, bf16, q8_0"):
        export_model(setup["policy"].ref, setup["registry"], "gguf", dtype="q4_k")
    with pytest.raises(ExportError, match="HF export writes fp32, fp16, bf16"):
        export_model(setup["policy"].ref, setup["registry"], "hf", dtype="nf4")


def test_cli_export_prints_the_figures(setup, capsys):
    out = setup["root"] / "cli"
    args = ["--registry", str(setup["registry"].root), "export", setup["policy"].ref, "--format", "gguf",
            "--dtype", "q8_0", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{out}  (gguf q8_0" in printed and "tiny-sft-v1-q8_0.gguf" in printed
    assert "merge vs unmerged adapter: max |diff|" in printed and "reloaded vs the unmerged adapter (fp32)" in printed
    assert main(args) == 2  # exists: refused, not overwritten
    assert "already exists" in capsys.readouterr().err
