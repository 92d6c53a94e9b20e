"""Generation strategies on a tiny model: every setting reaches `generate` and does what it says (greedy is
deterministic, top-k=1 is greedy, min_new_tokens holds EOS back, penalties change the output, stop strings
end a response), the presence/frequency processor's arithmetic by hand, and the settings' validation."""

from __future__ import annotations

import pytest
import torch

from align.data.tokenize import encode_prompt
from align.errors import ConfigError
from align.models.generation import PresenceFrequencyPenalty, generate, library_only_settings, settings_with
from align.config.loading import validate_recipe
from align.config.schema import GenerationSettings


@pytest.fixture(scope="module")
def tiny(tiny_base, chatml_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights than the init's: greedy text that varies from token to token
        torch.manual_seed(0)
        for _, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    prompts = [encode_prompt(chatml_tokenizer, [{"role": "user", "content": text}])
               for text in ["What is 3 + 4?", "Hello there", "Please write a short poem about the sea."]]
    return model, chatml_tokenizer, prompts


def ids(generated):
    return [g.token_ids for g in generated]


def test_greedy_is_deterministic_and_top_k_one_equals_greedy(tiny):
    model, tokenizer, prompts = tiny
    greedy = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12))
    assert ids(generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12))) == ids(greedy)
    torch.manual_seed(1)
    top1 = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12, temperature=1.5, top_k=1))
    assert ids(top1) == ids(greedy)
    torch.manual_seed(1)
    sampled = generate(model, tokenizer, prompts * 3, GenerationSettings(max_new_tokens=12, temperature=1.5))
    assert len({tuple(t) for t in ids(sampled)}) > 3  # sampling really samples


def test_every_setting_reaches_generate(tiny, monkeypatch):
    model, tokenizer, prompts = tiny
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    settings = GenerationSettings(max_new_tokens=9, min_new_tokens=3, temperature=0.7, top_k=20, top_p=0.9,
                                  num_beams=2, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25,
                                  stop=["\n\n"])
    generate(model, tokenizer, prompts[:1], settings)
    assert (seen["max_new_tokens"], seen["min_new_tokens"], seen["do_sample"], seen["temperature"], seen["top_k"],
            seen["top_p"], seen["num_beams"], seen["repetition_penalty"], seen["stop_strings"]) == \
        (9, 3, True, 0.7, 20, 0.9, 2, 1.3, ["\n\n"])
    [processor] = seen["logits_processor"]
    assert (processor.presence, processor.frequency) == (0.5, 0.25)
    assert processor.prompt_length == len(prompts[0])
    seen.clear()
    generate(model, tokenizer, prompts[:1], GenerationSettings(max_new_tokens=4))  # defaults: nothing extra passed
    assert not {"num_beams", "repetition_penalty", "min_new_tokens", "logits_processor"} & set(seen)


def test_presence_and_frequency_penalty_arithmetic_by_hand():
    prompt = [[9, 9, 9]]  # prompt tokens are not counted
    input_ids = torch.tensor([p + [5, 5, 7] for p in prompt])
    scores = torch.zeros(1, 10)
    out = PresenceFrequencyPenalty(presence=0.5, frequency=0.25, prompt_length=3)(input_ids, scores)
    expected = torch.zeros(1, 10)
    expected[0, 5] = -(0.5 + 2 * 0.25)
    expected[0, 7] = -(0.5 + 1 * 0.25)
    assert torch.equal(out, expected)
    nothing_yet = PresenceFrequencyPenalty(0.5, 0.25, prompt_length=6)(input_ids, scores)
    assert torch.equal(nothing_yet, scores)


def test_presence_penalty_removes_a_repeat_that_greedy_makes(tiny):
    model, tokenizer, prompts = tiny
    greedy = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=16))
    repeats = [len(t) - len(set(t)) for t in ids(greedy)]
    assert sum(repeats) > 0  # the tiny model repeats itself somewhere
    penalized = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=16, presence_penalty=2.0))
    assert ids(penalized) != ids(greedy)
    assert sum(len(t) - len(set(t)) for t in ids(penalized)) < sum(repeats)
    for g, p in zip(ids(greedy), ids(penalized)):  # identical up to the first repeat greedy made
        first_repeat = next((i for i, t in enumerate(g) if t in g[:i]), len(g))
        assert p[:first_repeat] == g[:first_repeat]


def test_repetition_penalty_changes_the_output(tiny):
    model, tokenizer, prompts = tiny
    greedy = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=16))
    penalized = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=16, repetition_penalty=3.0))
    assert ids(penalized) != ids(greedy)


def test_min_new_tokens_holds_eos_back(tiny):
    model, tokenizer, prompts = tiny
    eos = tokenizer.eos_token_id

    def favour_eos(module, inputs, output):
        output[..., eos] += 100.0
        return output

    handle = model.lm_head.register_forward_hook(favour_eos)
    try:
        early = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=10))
        held = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=10, min_new_tokens=6))
    finally:
        handle.remove()
    assert all(g.token_ids == [eos] and g.ended_with_eos for g in early)
    assert all(len(g.token_ids) == 7 and g.token_ids[-1] == eos and eos not in g.token_ids[:-1] for g in held)


def test_stop_strings_end_the_response_where_they_appear(tiny):
    model, tokenizer, prompts = tiny
    free = generate(model, tokenizer, prompts[:1], GenerationSettings(max_new_tokens=16))[0]
    # a piece of text greedy produces after its third token
    position, stop = next((i, text.strip()[0]) for i, t in enumerate(free.token_ids)
                          if i >= 3 and (text := tokenizer.decode([t], skip_special_tokens=True)).strip())
    stopped = generate(model, tokenizer, prompts[:1], GenerationSettings(max_new_tokens=16, stop=[stop]))[0]
    assert stopped.ended_with_eos and stop in stopped.text
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) <= position + 1 < len(free.token_ids)
    assert stop not in tokenizer.decode(stopped.token_ids[:-1], skip_special_tokens=True)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(tiny):
    model, tokenizer, prompts = tiny
    fixed = dict(max_new_tokens=6, min_new_tokens=6)
    greedy = generate(model, tokenizer, prompts, GenerationSettings(**fixed))
    beams = generate(model, tokenizer, prompts, GenerationSettings(num_beams=4, **fixed))

    def logp(prompt, response):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].float()
        eos = tokenizer.eos_token_id
        logits[: len(response) - 1, eos] = float("-inf")  # what min_new_tokens allowed
        return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).sum())

    assert ids(beams) != ids(greedy)
    for prompt, g, b in zip(prompts, ids(greedy), ids(beams)):
        assert logp(prompt, b) >= logp(prompt, g) - 1e-4


def test_settings_are_validated_and_flags_name_themselves():
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationSettings(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ConfigError) as err:
        settings_with(GenerationSettings(), {"top_p": 1.5, "num_beams": 0})
    assert "--top-p" in str(err.value) and "--num-beams" in str(err.value)
    assert settings_with(GenerationSettings(), {"temperature": 0.5}).temperature == 0.5
    assert library_only_settings(GenerationSettings()) == []
    assert library_only_settings(GenerationSettings(presence_penalty=0.1, min_new_tokens=2)) == \
        ["presence_penalty", "min_new_tokens"]


def test_ppo_refuses_beam_search_at_validation(tiny_raw_recipe, tmp_path):
    raw = tiny_raw_recipe(tmp_path)
    raw["stages"]["ppo"] = {"from": "sft", "prompts": str(tmp_path / "eval_prompts.jsonl"),
                            "rewards": [{"checker": "math_answer"}], "generation": {"num_beams": 4, "temperature": 1.0}}
    with pytest.raises(ConfigError) as err:
        validate_recipe(raw, [])
    assert "stages.ppo" in str(err.value) and "num_beams" in str(err.value) and "sampled" in str(err.value)


def test_rollouts_fall_back_to_generate_for_settings_our_sampler_lacks(tiny, monkeypatch):
    import align.rl.rollout as rollout
    import align.rl.sampler as sampler

    model, tokenizer, prompts = tiny
    calls = []
    monkeypatch.setattr(sampler, "sample", lambda *a, **k: calls.append("sampler") or None)
    real = rollout.generate
    monkeypatch.setattr(rollout, "generate", lambda *a, **k: calls.append("generate") or real(*a, **k))
    rows = [{}] * len(prompts)
    out = rollout.sample_rollouts(model, tokenizer, rows, prompts,
                                  GenerationSettings(max_new_tokens=5, min_new_tokens=5, temperature=1.0), 8)
    assert calls == ["generate"] and len(out) == len(prompts)
    assert all(int(n) == 5 for n in out.response_lengths)
    calls.clear()
    rollout.sample_rollouts(model, tokenizer, rows, prompts, GenerationSettings(max_new_tokens=5, temperature=1.0), 8)
    assert calls[0] == "sampler"  # plain sampling stays on our sampler (here it declines, so generate follows)
