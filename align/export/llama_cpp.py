"""A GGUF export checked by the program people run it with: llama.cpp, through `llama-cpp-python`.

Why it is built this way:
- `align export --format gguf` already reloads its file with transformers' GGUF loader, which is lenient:
  it reads our tensors and tokenizer back the way we wrote them. llama.cpp (and Ollama and LM Studio on
  top of it) is the real consumer: it picks its own pre-tokenizer regex by name, decides which tokens end
  generation, applies its own rope and norm settings. So the check runs the file in llama.cpp and
  compares it with the fp32 Hugging Face model (adapters merged) on fixed chat prompts in the model's own
  template: the prompt's token ids as llama.cpp tokenizes the same text, the logits at every prompt
  position (top-1 agreement and the largest gap), the greedy continuation, and whether llama.cpp stops
  where transformers stops (the end-of-turn token).
- `llama-cpp-python` is an optional extra (`align[llama-cpp]`): it builds llama.cpp from source, which
  takes minutes on a small CPU, so neither the default install nor the default test run needs it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from align.errors import ExportError

log = logging.getLogger(__name__)

CHECK_CHATS = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name a colour of the sky."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]
INSTALL = 'pip install "align[llama-cpp]" (builds llama.cpp from source: several minutes)'


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"checking a GGUF file in llama.cpp needs llama-cpp-python: {INSTALL}") from None
    return llama_cpp


def open_in_llama_cpp(path: Path, n_ctx: int = 512):
    """The GGUF file loaded by llama.cpp, every position's logits kept, its own logging silenced."""
    llama_cpp = require_llama_cpp()
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                               n_threads=max(torch.get_num_threads(), 1))
    except Exception as err:  # noqa: BLE001 - llama.cpp's loader says only "failed to load model"
        raise ExportError(f"{path.name}: llama.cpp cannot load it ({err})") from None


def prompt_ids(tokenizer, chat: list[dict]) -> tuple[str, list[int]]:
    from align.data.tokenize import encode_prompt, render

    return render(tokenizer, chat, add_generation_prompt=True), encode_prompt(tokenizer, chat)


@torch.no_grad()
def check_prompt(llm, model, tokenizer, chat: list[dict], max_new_tokens: int) -> dict:
    """One chat prompt through both: ids, logits over the prompt, the greedy answer and where it stops."""
    import numpy as np

    from align.config.schema import GenerationSettings
    from align.models.generation import generate

    text, ids = prompt_ids(tokenizer, chat)
    cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id] and cpp_ids[:1] != ids[:1]:
        cpp_ids = [tokenizer.bos_token_id, *cpp_ids]  # a BOS the tokenizer prepends, which the text lacks
    llm.reset()
    llm.eval(ids)
    cpp_logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    hf_logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    top1 = float((cpp_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean())
    gap = float((cpp_logits - hf_logits).abs().max())
    [hf] = generate(model, tokenizer, [ids], GenerationSettings(max_new_tokens=max_new_tokens), 1)
    hf_tokens = hf.token_ids[:-1] if hf.ended_with_eos else hf.token_ids
    cpp_tokens, end = greedy_tokens(llm, ids, max_new_tokens)
    stopped = end is not None
    margin = parting_margin(model, ids, hf.token_ids, cpp_tokens + ([end] if stopped else []))
    return {"prompt": chat[-1]["content"], "tokens_match": cpp_ids == ids, "top1_agreement": top1,
            "max_logit_gap": gap, "logit_scale": float(hf_logits.abs().max()),
            "hf_answer": hf.text, "llama_cpp_answer": tokenizer.decode(cpp_tokens, skip_special_tokens=True),
            "greedy_match": cpp_tokens == hf_tokens, "parting_margin": margin,
            "parted_at_near_tie": margin is not None and margin <= gap,
            # a token llama.cpp ends generation at and transformers writes and runs on after (e.g. <|endoftext|>)
            "llama_cpp_only_stop": tokenizer.decode([end]) if stopped and not hf.ended_with_eos
            and hf.token_ids[len(cpp_tokens):len(cpp_tokens) + 1] == [end] else None,
            "hf_stopped": hf.ended_with_eos, "llama_cpp_stopped": stopped}


@torch.no_grad()
def parting_margin(model, ids: list[int], hf_tokens: list[int], cpp_tokens: list[int]) -> float | None:
    """Where the two greedy answers (end tokens included) first differ, how far the fp32 model prefers its
    token over llama.cpp's (None where one is the other's start: cut at max_new_tokens). A margin within the
    logit gap measured between the two programs is a near tie that rounding decides, not another model."""
    step = next((i for i, (a, b) in enumerate(zip(hf_tokens, cpp_tokens)) if a != b), None)
    if step is None:
        return None
    logits = model(input_ids=torch.tensor([ids + hf_tokens[:step]])).logits[0, -1].float()
    return float(logits[hf_tokens[step]] - logits[cpp_tokens[step]])


def greedy_tokens(llm, ids: list[int], max_new_tokens: int) -> tuple[list[int], int | None]:
    """llama.cpp's greedy continuation of `ids` (its own sampler at temperature 0), up to the first token it
    treats as the end of generation; and that token, where it reached one."""
    import llama_cpp

    tokens: list[int] = []
    llm.reset()
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            return tokens, token
        tokens.append(token)
        if len(tokens) >= max_new_tokens:
            break
    return tokens, None


# The least top-1 agreement over prompt positions each stored precision must reach in llama.cpp. llama.cpp
# also rounds activations for quantized matmuls (q8_0 x q8_0 dot products), so its q8_0 logits are further
# from fp32 than the same file dequantized in transformers; positions where the top two logits are close
# (predicting a user's words) flip first. Measured on quickstart/sft: f16 100%, q8_0 94.4%.
MIN_TOP1 = {"f32": 0.99, "f16": 0.98, "bf16": 0.95, "q8_0": 0.90}


def ends_generation(llm, tokenizer) -> dict:
    """Whether llama.cpp ends generation at the template's end-of-turn token and at the EOS."""
    import llama_cpp

    from align.models.stop_tokens import template_end_token_id

    ids = {"end_of_turn": template_end_token_id(tokenizer), "eos": tokenizer.eos_token_id}
    return {name: bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)) for name, i in ids.items() if i is not None}


def check_gguf_in_llama_cpp(path: Path, model, tokenizer, max_new_tokens: int = 32, dtype: str = "f16") -> dict:
    """Every check prompt through llama.cpp and the fp32 model; the summary figures and whether they hold:
    the same prompt ids, top-1 agreement of at least `MIN_TOP1[dtype]` over prompt positions, llama.cpp
    ending generation at the end-of-turn token, and stopping wherever its answer is transformers' answer
    and transformers stopped. The greedy match itself is reported, not required: a quantized file may pick
    another token where the top two are close, and the answers part from there (counted as a near tie when
    the fp32 model's margin there is within the measured logit gap)."""
    llm = open_in_llama_cpp(path)
    try:
        rows = [check_prompt(llm, model, tokenizer, chat, max_new_tokens) for chat in CHECK_CHATS]
        eog = ends_generation(llm, tokenizer)
    finally:
        if hasattr(llm, "close"):
            llm.close()
    stops = [r["llama_cpp_stopped"] for r in rows if r["hf_stopped"] and r["greedy_match"]]
    summary = {"file": path.name, "size_bytes": path.stat().st_size, "prompts": len(rows),
               "tokens_match": all(r["tokens_match"] for r in rows),
               "top1_agreement": sum(r["top1_agreement"] for r in rows) / len(rows),
               "min_top1_agreement": MIN_TOP1.get(dtype, 0.90),
               "max_logit_gap": max(r["max_logit_gap"] for r in rows),
               "logit_scale": max(r["logit_scale"] for r in rows),
               "greedy_match": sum(r["greedy_match"] for r in rows) / len(rows),
               "greedy_near_ties": sum(r["parted_at_near_tie"] for r in rows),
               "ends_generation": eog,
               "stops_at_end_of_turn": all(stops) if stops else None, "rows": rows}
    summary["passed"] = bool(summary["tokens_match"] and summary["top1_agreement"] >= summary["min_top1_agreement"]
                             and all(eog.values()) and summary["stops_at_end_of_turn"] is not False)
    return summary


def table(results: list[dict]) -> str:
    """The markdown table `align check-export` prints: one line per (model, dtype)."""
    lines = ["| model | dtype | size | same prompt ids | top-1 agreement (min) | max logit gap (scale) "
             "| greedy match | ends at end of turn | stops where transformers stops | passed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        stops = {True: "yes", False: "NO", None: "n/a"}[r["stops_at_end_of_turn"]]
        eog = "yes" if all(r["ends_generation"].values()) else "NO"
        ties = f" (+{r['greedy_near_ties']} parted at a near tie)" if r.get("greedy_near_ties") else ""
        lines.append(f"| {r['model']} | {r['dtype']} | {r['size_bytes'] / 2**20:.1f} MiB | "
                     f"{'yes' if r['tokens_match'] else 'NO'} | {100 * r['top1_agreement']:.1f}% "
                     f"({100 * r['min_top1_agreement']:.0f}%) | {r['max_logit_gap']:.3g} ({r['logit_scale']:.3g}) | "
                     f"{100 * r['greedy_match']:.0f}%{ties} | {eog} | {stops} | {'yes' if r['passed'] else 'NO'} |")
    return "\n".join(lines)


def check_export(ref: str, registry, dtypes: list[str], out: Path | None = None,
                 max_new_tokens: int = 32) -> list[dict]:
    """Export `ref` to GGUF in each of `dtypes` (verified as `align export` verifies), run each file in
    llama.cpp against the fp32 model, and write the figures to `out` (JSON) when given."""
    import tempfile

    from align.export.command import export_model, load_source, refuse_before_loading
    from align.export.gguf import gguf_dtype
    from align.models.loading import materialize, resolve_model_ref
    from align.registry.records import write_json_atomic

    dtypes = [gguf_dtype(d) for d in dtypes]  # every --dtypes value checked before any export starts
    require_llama_cpp()
    source = materialize(resolve_model_ref(ref, registry), registry)
    label = source.entry.ref if source.entry is not None else ref
    refuse_before_loading(source, registry, "gguf")
    loaded = load_source(source, registry)  # fp32, adapters merged once: what every file is checked against
    results = []
    with tempfile.TemporaryDirectory(prefix="align-check-export-") as tmp:
        files = {}
        for dtype in dtypes:
            report = export_model(ref, registry, "gguf", dtype, out=Path(tmp) / dtype, loaded=loaded)
            files[dtype] = next(Path(report["path"]).glob("*.gguf"))
        for dtype, path in files.items():
            figures = check_gguf_in_llama_cpp(path, loaded.model, loaded.tokenizer, max_new_tokens, dtype)
            results.append({"model": label, "dtype": dtype, **figures})
            log.info("llama.cpp %s %s: top-1 %.1f%%, max logit gap %.3g, greedy match %.0f%%, %s", label, dtype,
                     100 * figures["top1_agreement"], figures["max_logit_gap"], 100 * figures["greedy_match"],
                     "passed" if figures["passed"] else "FAILED")
    if out is not None:
        write_json_atomic(Path(out), {"ref": label, "results": results})
    return results
