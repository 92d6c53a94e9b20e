"""Our RL sampling loop (finished rows leave the batch) against transformers' `generate` on a tiny model:
the same greedy tokens, top-k=1 equal to greedy, EOS ends a row, max_new_tokens and stop strings hold."""

from __future__ import annotations

import pytest
import torch

from align.data.tokenize import encode_prompt
from align.models.generation import generate
from align.config.schema import GenerationSettings
from align.rl.sampler import sample


@pytest.fixture(scope="module")
def tiny(tiny_base, chatml_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights than the init's: greedy text that varies from token to token
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    prompts = [encode_prompt(chatml_tokenizer, [{"role": "user", "content": text}])
               for text in ["What is 3 + 4?", "Hello there", "Please write a short poem about the sea."]]
    return model, chatml_tokenizer, prompts


def test_greedy_tokens_equal_generate(tiny):
    model, tokenizer, prompts = tiny
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0)
    ours = sample(model, tokenizer, prompts, settings)
    theirs = generate(model, tokenizer, prompts, settings, batch_size=8)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]
    assert len({t for g in ours for t in g.token_ids}) > 3
    assert [g.text for g in ours] == [g.text for g in theirs]


def test_top_k_one_is_greedy_and_lengths_are_bounded(tiny):
    model, tokenizer, prompts = tiny
    greedy = sample(model, tokenizer, prompts, GenerationSettings(max_new_tokens=10, temperature=0.0))
    torch.manual_seed(3)
    top1 = sample(model, tokenizer, prompts, GenerationSettings(max_new_tokens=10, temperature=1.0, top_k=1))
    assert [g.token_ids for g in top1] == [g.token_ids for g in greedy]
    torch.manual_seed(3)
    sampled = sample(model, tokenizer, prompts * 4, GenerationSettings(max_new_tokens=10, temperature=1.0))
    assert all(1 <= len(g.token_ids) <= 10 for g in sampled)
    assert len({tuple(g.token_ids) for g in sampled}) > 3  # sampling, not greedy


def test_a_row_that_ends_leaves_the_batch_without_changing_the_others(tiny, monkeypatch):
    """Force EOS for the first row at the second step: it stops there, and the rows still going (now
    computed from a cache with that row removed) produce exactly the tokens they produce without it."""
    import align.rl.sampler as sampler

    model, tokenizer, prompts = tiny
    eos = tokenizer.eos_token_id
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0)
    free = sample(model, tokenizer, prompts, settings)
    original, calls = sampler._next_tokens, []

    def forced(logits, settings):
        tokens = original(logits, settings)
        calls.append(len(tokens))
        if len(calls) == 2:
            tokens[0] = eos
        return tokens

    monkeypatch.setattr(sampler, "_next_tokens", forced)
    out = sample(model, tokenizer, prompts, settings)
    assert out[0].token_ids == free[0].token_ids[:1] + [eos] and out[0].ended_with_eos
    assert calls[2] == len(prompts) - 1  # the ended row no longer computed
    assert [g.token_ids for g in out[1:]] == [g.token_ids for g in free[1:]]


def test_stop_strings_end_a_response(tiny):
    model, tokenizer, prompts = tiny
    settings = GenerationSettings(max_new_tokens=16, temperature=1.0)
    torch.manual_seed(5)
    free = sample(model, tokenizer, prompts[:1], settings)[0]
    position, stop = next((i, text.strip()[0]) for i, t in enumerate(free.token_ids)
                          if i >= 2 and (text := tokenizer.decode([t], skip_special_tokens=True)).strip())
    torch.manual_seed(5)
    stopped = sample(model, tokenizer, prompts[:1], settings.model_copy(update={"stop": [stop]}))[0]
    assert stop in stopped.text and len(stopped.token_ids) <= position + 1 and stopped.ended_with_eos
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]


def test_a_prompt_prefilled_once_for_its_group_samples_as_if_repeated(tiny):
    """k rows per prompt: one prefill, the cache repeated k times; the same tokens (greedy, and sampled from
    the same seed) as prefilling every row."""
    model, tokenizer, prompts = tiny
    rows = [p for p in prompts for _ in range(3)]
    for settings in (GenerationSettings(max_new_tokens=10, temperature=0.0),
                     GenerationSettings(max_new_tokens=10, temperature=1.0)):
        torch.manual_seed(5)
        each = sample(model, tokenizer, rows, settings)
        torch.manual_seed(5)
        shared = sample(model, tokenizer, rows, settings, group=3)
        assert [g.token_ids for g in shared] == [g.token_ids for g in each]
    assert len({tuple(g.token_ids) for g in shared}) > 3  # sampled rows of one prompt differ


def test_draw_follows_the_distribution_and_never_picks_an_impossible_token():
    from align.rl.sampler import draw

    torch.manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.2, 0.0, 0.3], [0.1, 0.0, 0.0, 0.9, 0.0]])
    picks = torch.stack([draw(probs) for _ in range(20_000)])
    for row in range(2):
        freq = torch.bincount(picks[:, row], minlength=5).double() / len(picks)
        assert torch.allclose(freq, probs[row].double(), atol=0.012), freq
        assert freq[probs[row] == 0].sum() == 0
    assert draw(torch.tensor([[0.0, 0.0, 1.0]])).tolist() == [2]


@pytest.mark.parametrize("settings", [GenerationSettings(max_new_tokens=8, temperature=0.0),
                                      GenerationSettings(max_new_tokens=8, temperature=0.7, top_k=5)],
                         ids=["greedy", "t0.7-top5"])
def test_the_sampler_keeps_the_log_prob_the_policy_gives_each_drawn_token(tiny, settings):
    """Greedy: at temperature 1; sampling: at the sampling temperature, before top-k. Both are what the
    teacher-forced policy pass gives the same tokens (`token_logps` at the PPO loop's temperature), so in fp32
    they agree to rounding; the top-k-renormalized log-prob would not (it is higher)."""
    from align.models.logprobs import token_logps
    from align.rl.rollout import pack

    model, tokenizer, prompts = tiny
    torch.manual_seed(4)
    out = sample(model, tokenizer, prompts, settings)
    assert all(len(g.token_logps) == len(g.token_ids) for g in out)
    ids, mask, labels = pack(prompts, [g.token_ids for g in out], tokenizer.pad_token_id)
    with torch.no_grad():
        teacher = token_logps(model, ids, mask, labels, settings.temperature or 1.0)["logps"]
    for row, (prompt, g) in enumerate(zip(prompts, out)):
        expected = teacher[row, len(prompt) - 1: len(prompt) - 1 + len(g.token_ids)]
        assert torch.allclose(torch.tensor(g.token_logps), expected, atol=1e-4), (g.token_logps, expected)
    drawn = torch.tensor([lp for g in out for lp in g.token_logps])
    assert bool((drawn < -1e-3).any())  # not all certain: the comparison has something to compare
