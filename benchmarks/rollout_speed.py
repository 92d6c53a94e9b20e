"""Rollout sampling speed on the default model: transformers' `generate` against our sampling loop (finished
responses leave the batch), with fp32 weights under bf16 autocast and with bf16 weights; then a LoRA policy
as PPO holds it (fp32 weights, r=16 on the top 16 blocks), decoded through PEFT's wrappers against the
sampling copy with the adapter folded in (`align.rl.sampling_copy`), in fp32 under autocast and in bf16.

    python benchmarks/rollout_speed.py [--rows 32] [--max-new-tokens 64] [--repeats 2]

Prints seconds per batch and generated tokens per second for each variant. Needs the packaged default model
(registered on first use) and the quickstart's RL prompts."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from align.data.tokenize import encode_prompt
from align.models.generation import generate
from align.runtime.precision import inference_autocast
from align.models.loading import load_causal_lm, load_tokenizer, resolve_model_ref
from align.config.schema import GenerationSettings
from align.registry.store import Registry
from align.rl.sampler import sample

ROOT = Path(__file__).resolve().parent.parent


def rl_prompts(tokenizer, prompts: int, samples: int) -> list[list[int]]:
    """The first `prompts` quickstart RL prompts as chat prompt ids, each repeated `samples` times in a row."""
    rows = [json.loads(line) for line in (ROOT / "data/quickstart/rl_prompts.jsonl").open()][:prompts]
    return [encode_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows for _ in range(samples)]


def ppo_lora_policy(model):
    """A fresh LoRA adapter as the math RL recipe puts it: r=16 on every block linear of the top 16 blocks."""
    from peft import LoraConfig, get_peft_model

    from align.models.loading import block_linear_names

    layers = list(range(14, model.config.num_hidden_layers))
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, layers_to_transform=layers,
                                            target_modules=block_linear_names(model))).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--registry", default=str(ROOT / "registry"))
    args = parser.parse_args()
    registry = Registry(args.registry)
    source = resolve_model_ref("smollm2-135m-instruct", registry)
    tokenizer = load_tokenizer(source, registry)
    prompts = rl_prompts(tokenizer, args.rows // 4, 4)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.7)
    print(f"{len(prompts)} rollouts, max_new_tokens {args.max_new_tokens}, temperature 0.7, "
          f"{torch.get_num_threads()} threads")
    for dtype in ("fp32", "bf16"):
        model = load_causal_lm(source, registry, dtype=dtype).eval()
        for name in ("generate", "sampler"):
            seconds, tokens = [], 0
            for repeat in range(args.repeats):
                torch.manual_seed(repeat)
                started = time.perf_counter()
                if name == "generate":
                    out = generate(model, tokenizer, prompts, settings, len(prompts), autocast=True)
                else:
                    with inference_autocast(model):
                        out = sample(model, tokenizer, prompts, settings)
                seconds.append(time.perf_counter() - started)
                tokens += sum(len(g.token_ids) for g in out)
            mean = sum(seconds) / len(seconds)
            print(f"{dtype:>5} weights  {name:>8}: {mean:6.2f} s per batch, {tokens / sum(seconds):6.1f} tokens/s, "
                  f"mean response {tokens / args.repeats / len(prompts):.1f} tokens")
        if dtype == "fp32":  # as PPO holds a LoRA policy: fp32 weights, sampled under bf16 autocast
            lora_policy(model, tokenizer, prompts, settings, args.repeats)
        del model


def lora_policy(model, tokenizer, prompts, settings, repeats: int) -> None:
    from align.rl.sampling_copy import build

    policy = ppo_lora_policy(model)
    same_dtype, bf16 = build(policy), build(policy, dtype=torch.bfloat16)
    for name, decoder in (("through PEFT", lambda: policy), ("sampling copy", same_dtype.sync),
                          ("bf16 sampling copy", bf16.sync)):
        seconds, tokens = [], 0
        for repeat in range(repeats):
            torch.manual_seed(repeat)
            started = time.perf_counter()
            target = decoder()  # the copy's sync (folding the adapter in) is part of its cost
            with inference_autocast(target):
                out = sample(target, tokenizer, prompts, settings)
            seconds.append(time.perf_counter() - started)
            tokens += sum(len(g.token_ids) for g in out)
        print(f" LoRA policy {name:>18}: {sum(seconds) / len(seconds):6.2f} s per batch, "
              f"{tokens / sum(seconds):6.1f} tokens/s")


if __name__ == "__main__":
    main()
