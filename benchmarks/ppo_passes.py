"""PPO's scoring and training passes on the default model: each row teacher-forced on its own against each
prompt run once for its k samples (`align.models.logprobs.grouped_hidden`), plus sampling with and without the
shared prefill.

    python benchmarks/ppo_passes.py [--prompts 8] [--samples 8] [--max-new-tokens 32]

Prints seconds for the reference pass (no grad) and the trained pass (forward + backward) on one rollout
of a LoRA policy (r=16 on the top 16 of 30 blocks, bf16 base, bf16 autocast), as the math RL recipe runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from align.models.logprobs import token_logps
from align.runtime.precision import inference_autocast
from align.models.loading import load_causal_lm, load_tokenizer, resolve_model_ref
from align.config.schema import GenerationSettings
from align.registry.store import Registry
from align.rl.rollout import pack
from align.rl.sampler import sample
from rollout_speed import ppo_lora_policy, rl_prompts  # benchmarks/ is the script's folder

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--registry", default=str(ROOT / "registry"))
    args = parser.parse_args()
    registry = Registry(args.registry)
    source = resolve_model_ref("smollm2-135m-instruct", registry)
    tokenizer = load_tokenizer(source, registry)
    model = load_causal_lm(source, registry, dtype="bf16")
    policy = ppo_lora_policy(model)
    k = args.samples
    prompts = rl_prompts(tokenizer, args.prompts, k)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.7)
    print(f"{len(prompts)} rollouts ({args.prompts} prompts x {k}), max_new_tokens {args.max_new_tokens}, "
          f"{torch.get_num_threads()} threads")
    for group in (1, k):
        def run():
            torch.manual_seed(0)
            with inference_autocast(policy):
                return sample(policy, tokenizer, prompts, settings, group=group)
        print(f"  sampling, prefill {'once per prompt' if group > 1 else 'per row':>15}: {timed(run):6.2f} s")
    out = run()
    ids, mask, labels = pack(prompts, [g.token_ids or [tokenizer.eos_token_id] for g in out], tokenizer.pad_token_id)
    print(f"  packed: {int(mask.sum())} tokens, {int((labels != -100).sum())} response tokens")
    for group in (1, k):
        def reference():
            with torch.no_grad(), policy.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
                for start in range(0, len(prompts), 16):
                    token_logps(policy, ids[start:start + 16], mask[start:start + 16], labels[start:start + 16],
                                0.7, group=group)

        def trained():
            policy.zero_grad()
            for start in range(0, len(prompts), 16):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logps = token_logps(policy, ids[start:start + 16], mask[start:start + 16],
                                        labels[start:start + 16], 0.7, group=group)["logps"]
                logps.sum().backward()
        label = "prompt once per group" if group > 1 else "every row"
        print(f"  {label:>21}: reference pass {timed(reference):6.2f} s, trained pass {timed(trained):6.2f} s")


if __name__ == "__main__":
    main()
