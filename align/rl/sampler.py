"""A sampling loop for RL rollouts that stops computing for a response as soon as it ends.

Why not only `model.generate`: a batch there runs until its longest response ends, every row paying for
every step. RL rollouts vary a lot in length (a policy learning to answer briefly still has stragglers
that run to `max_new_tokens`), so here finished rows leave the batch and the KV cache (`DynamicCache.
batch_select_indices`) and later steps compute only for the rows still going. The prompt's LM head is
projected at its last position only. Sampling is temperature, top-k and top-p, the same as `generate`'s,
with stop strings checked on each row's decoded tail.

RL samples k responses per prompt: with `group=k` each prompt is prefilled once and its KV cache repeated for
its k rows (SmolLM2's chat prompt is about 40 tokens, longer than a typical arithmetic answer).

Each response keeps the sampler's log-prob of every token it drew (`Generated.token_logps`, see
`sampled_logps`), so the PPO loop can measure how far the sampler is from the policy it trains
(`align.rl.logprob_mismatch`).

A row ends at any of the turn's end ids (`align.models.stop_tokens.stop_token_ids`: the template's
end-of-turn token and the tokenizer's EOS, which differ in Gemma, Phi-3 and Qwen base models).

`sample` returns None when the model's cache cannot drop rows; callers then use `generate`.
"""

from __future__ import annotations

import torch

from align.data.sampling import pad_left
from align.models.generation import Generated
from align.models.stop_tokens import stop_token_ids


def _filter(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _next_tokens(logits: torch.Tensor, settings) -> torch.Tensor:
    logits = logits.float()
    if not settings.temperature:
        return logits.argmax(dim=-1)
    logits = _filter(logits / settings.temperature, settings.top_k, settings.top_p)
    return draw(torch.softmax(logits, dim=-1))


def sampled_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """log softmax(logits / T)[token] for each row, in fp32, with T = `temperature` (1 for greedy decoding).

    What the trained policy's log-probs are (`align.models.logprobs.token_logps` at the loop's temperature,
    also 1 for greedy), so the two compare like with like: the same scaling, and no top-k/top-p filtering
    (which changes which tokens can be drawn, not the log-prob the PPO ratio uses). What differs is only how
    the sampler computed its logits: its own copy of the weights (the adapter folded in, maybe bf16), bf16
    autocast, the KV cache."""
    scaled = logits.float() / (temperature or 1.0)
    return scaled.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [rows, vocab], by inverting each row's CDF at one uniform number.

    The same distribution as `torch.multinomial(probs, 1)`, which on a CPU draws an exponential number for
    every vocabulary entry: 32 ms a decoding step for 32 rows of SmolLM2's 49,152 entries against 1.7 ms
    here, and it was 21% of a rollout's time in a profile. The CDF is summed in float64 so the tail keeps
    its mass; `right=True` never lands on a zero-probability entry before the first positive one."""
    cdf = probs.double().cumsum(dim=-1)
    point = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, point, right=True).clamp_(max=probs.shape[-1] - 1)
    # Rounding can put `point` at the very end, past the last positive entry: take the likeliest token then.
    dead = probs.gather(-1, picked) <= 0
    if bool(dead.any()):
        picked = torch.where(dead, probs.argmax(dim=-1, keepdim=True), picked)
    return picked.squeeze(-1)


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: list[list[int]], settings, group: int = 1) -> list[Generated] | None:
    """One response per prompt (one batch, left-padded), in input order; None if the cache cannot drop rows.
    `group`: consecutive runs of that many rows share their prompt, which is prefilled once."""
    from transformers import DynamicCache

    from align.models.loading import contiguous_head_input
    from align.models.renamed_arguments import cache_argument

    contiguous_head_input(model)
    device = next(model.parameters()).device
    ends = stop_token_ids(tokenizer)
    end_ids = torch.tensor(ends, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = len(prompt_ids)
    shared = group > 1 and rows % group == 0 and all(
        prompt_ids[i] == prompt_ids[i - i % group] for i in range(rows))
    unique = prompt_ids[::group] if shared else prompt_ids
    input_ids, attention = pad_left(unique, pad)
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    if not hasattr(cache, "batch_select_indices"):
        return None
    cached = {cache_argument(model): cache, "use_cache": True}
    was_training = model.training
    model.eval()
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, **cached, logits_to_keep=1)
    logits = out.logits[:, -1]
    if shared:
        cache.batch_repeat_interleave(group)
        logits, attention, positions = (t.repeat_interleave(group, dim=0) for t in (logits, attention, positions))
    active = torch.arange(rows)
    next_position = positions[:, -1] + 1
    generated: list[list[int]] = [[] for _ in range(rows)]
    logps: list[list[float]] = [[] for _ in range(rows)]
    ended = [False] * rows
    stops = list(settings.stop or [])
    for step in range(settings.max_new_tokens):
        tokens = _next_tokens(logits, settings)
        done = torch.isin(tokens, end_ids)
        drawn = sampled_logps(logits, tokens, settings.temperature).tolist()
        for slot, (row, token) in enumerate(zip(active.tolist(), tokens.tolist())):
            generated[row].append(token)
            logps[row].append(drawn[slot])
            if token in ends:
                ended[row] = True
            elif stops:
                tail = tokenizer.decode(generated[row][-16:], skip_special_tokens=True)
                if any(stop in tail for stop in stops):
                    done[slot] = True
                    ended[row] = True  # a stop string is a proper end, as EOS is
        keep = ~done
        if step + 1 == settings.max_new_tokens or not bool(keep.any()):
            break
        if not bool(keep.all()):
            index = keep.nonzero().squeeze(-1)
            cache.batch_select_indices(index)
            active, tokens, attention, next_position = active[index.cpu()], tokens[index], attention[index], \
                next_position[index]
        attention = torch.cat([attention, attention.new_ones(attention.size(0), 1)], dim=-1)
        out = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_position[:, None],
                    **cached)
        logits = out.logits[:, -1]
        next_position = next_position + 1
    model.train(was_training)
    return [Generated(text=tokenizer.decode([t for t in ids if t not in ends], skip_special_tokens=True), token_ids=ids,
                      ended_with_eos=ended[row], token_logps=logps[row]) for row, ids in enumerate(generated)]
