"""The evaluation hook's loss: token-weighted NLL over labelled tokens, equal to the model's own loss."""

from __future__ import annotations

import pytest
import torch

from align.data.tokenize import encode_conversation
from align.eval.hook import _mean_nll
from align.models.tiny import make_model, make_tokenizer


def test_mean_nll_matches_the_models_own_loss_over_labelled_tokens():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, hidden=64).eval()
    data = [encode_conversation(tokenizer, [{"role": "user", "content": f"What is {i} + {i}?"},
                                            {"role": "assistant", "content": f"It is {2 * i}" + " ok" * i}], 128)
            for i in range(1, 6)]
    total, count = 0.0, 0
    with torch.no_grad():
        for e in data:  # one at a time, no padding: the reference value
            out = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            n = sum(1 for x in e.labels[1:] if x != -100)
            total, count = total + float(out.loss) * n, count + n
    assert _mean_nll(model, data, tokenizer.pad_token_id, batch_size=2) == pytest.approx(total / count, rel=1e-5)


# ------------------------------------------------------------------------------------------ new metrics

from align.eval.hook import distinct_n, eval_fingerprint, evaluate_model, measure_speed, win_rate  # noqa: E402
from align.registry.fingerprint import hash_json  # noqa: E402
from align.config.recipe import EvalSettings, GenerationSettings  # noqa: E402


def test_distinct_n_on_known_strings():
    texts = ["the cat the cat", "a dog"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)   # the, cat, a, dog of 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)   # (the cat) twice, (cat the), (a dog)
    assert distinct_n(["same same same"], 1) == pytest.approx(1 / 3)
    assert distinct_n(["one"], 2) == 0.0 and distinct_n([], 1) == 0.0


def test_win_rate_counts_ties_as_half():
    result = win_rate([2.0, 0.0, 1.0, 3.0], [1.0, 1.0, 1.0, 0.0])
    assert (result["win_rate_wins"], result["win_rate_ties"], result["win_rate_losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    # identical responses tie whatever their (batch-rounded) scores say
    assert win_rate([1.0, 2.0], [1.5, 1.0], same=[True, True])["win_rate"] == 0.5
    assert win_rate([1.0, 1.0 + 5e-5], [1.0 + 5e-5, 1.0])["win_rate_ties"] == 2  # within the tolerance
    with pytest.raises(ValueError, match="same prompts"):
        win_rate([1.0], [1.0, 2.0])


def _judged_recipe(tiny_recipe, folder, **eval_settings):
    return tiny_recipe(folder, eval_settings={"metrics": ["reward", "win_rate", "length", "repetition"],
                                              "reward_model": "tiny/reward", **eval_settings})


def test_hook_reward_and_win_rate_against_itself_is_one_half(tiny_recipe, tiny_base, tmp_path, tmp_registry,
                                                             tiny_reward):
    from transformers import AutoModelForCausalLM

    from align.data.tokenize import encode_prompt
    from align.eval.hook import load_eval_prompts
    from align.models.generation import generate
    from align.models.loading import ModelSource, load_tokenizer
    from align.rewards.scoring import load_reward_model, score_conversations

    judge_entry = tiny_reward(tmp_registry)
    recipe = _judged_recipe(tiny_recipe, tmp_path)
    source = ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base))
    tokenizer = load_tokenizer(source, tmp_registry)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    metrics = evaluate_model(recipe, model, tokenizer, registry=tmp_registry)

    # against the base (the default opponent), which is this very model: every prompt ties
    assert metrics["win_rate"] == 0.5 and metrics["win_rate_ties"] == 3 and metrics["win_rate_against"] == str(tiny_base)
    # the reward is the judge's score of the responses, computed here independently
    rows, _ = load_eval_prompts(recipe)
    responses = generate(model, tokenizer, [encode_prompt(tokenizer, r["messages"]) for r in rows],
                         recipe.eval.generation)
    judge, judge_tokenizer = load_reward_model(ModelSource(judge_entry.ref, "registry", judge_entry), tmp_registry)
    scores = score_conversations(judge, judge_tokenizer, [r["messages"] + [{"role": "assistant", "content": g.text}]
                                                          for r, g in zip(rows, responses)])
    assert metrics["reward_mean"] == pytest.approx(sum(scores) / 3, abs=1e-3)
    assert metrics["reward_min"] == pytest.approx(min(scores), abs=1e-3)
    assert metrics["response_tokens_mean"] == pytest.approx(sum(len(g.token_ids) for g in responses) / 3)
    assert metrics["distinct_1"] == pytest.approx(distinct_n([g.text for g in responses], 1))
    # the judge and the opponent are part of how it was measured
    _, prompts_fp = load_eval_prompts(recipe)
    assert metrics["eval_fingerprint"] == eval_fingerprint(recipe.eval, None, prompts_fp, {
        "reward_model": judge_entry.ref, "against": str(tiny_base)})
    assert metrics["eval_fingerprint"] != eval_fingerprint(recipe.eval, None, prompts_fp)


def test_win_rate_of_a_different_model_counts_every_prompt(tiny_recipe, tmp_path, tmp_registry, tiny_reward,
                                                           chatml_tokenizer):
    from align.models.tiny import make_model

    tiny_reward(tmp_registry)
    recipe = _judged_recipe(tiny_recipe, tmp_path)
    other = make_model(chatml_tokenizer, seed=7, hidden=128).eval()
    with torch.no_grad():  # larger weights than the init's, so that it says something other than the base
        for param in other.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    metrics = evaluate_model(recipe, other, chatml_tokenizer, registry=tmp_registry)
    assert metrics["win_rate_wins"] + metrics["win_rate_ties"] + metrics["win_rate_losses"] == 3
    assert metrics["win_rate"] == pytest.approx((metrics["win_rate_wins"] + 0.5 * metrics["win_rate_ties"]) / 3)
    assert metrics["win_rate_ties"] < 3  # a different model answers differently


def test_a_judge_stage_not_registered_yet_skips_reward_metrics(tiny_recipe, tiny_base, tmp_path, tmp_registry,
                                                              chatml_tokenizer):
    from align.models.tiny import make_model

    recipe = _judged_recipe(tiny_recipe, tmp_path)  # tiny/reward does not exist in this registry
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"reward_model": "sft"})})
    metrics = evaluate_model(recipe, make_model(chatml_tokenizer, hidden=128), chatml_tokenizer, registry=tmp_registry)
    assert "reward_mean" not in metrics and "win_rate" not in metrics
    assert "distinct_2" in metrics  # the other metrics still run


def test_speed_metrics_measure_a_slow_model_honestly(tiny_base, chatml_tokenizer):
    """Each forward pass sleeps 30 ms: time to first token and time per token are at least that, close to it,
    and tokens/s is output tokens over the measured time."""
    import time

    from transformers import AutoModelForCausalLM

    from align.data.tokenize import encode_prompt

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    handle = model.register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    prompts = [encode_prompt(chatml_tokenizer, [{"role": "user", "content": t}]) for t in ("hi", "What is 3 + 4?")]
    try:
        out = measure_speed(model, chatml_tokenizer, prompts, GenerationSettings(max_new_tokens=5, min_new_tokens=5))
        beams = measure_speed(model, chatml_tokenizer, prompts[:1],
                              GenerationSettings(max_new_tokens=4, min_new_tokens=4, num_beams=2))
    finally:
        handle.remove()
    assert out["speed_tokens"] == 10 and out["speed_prompts"] == 2
    assert 0.03 <= out["time_to_first_token_s"] < 0.09
    assert 0.03 <= out["time_per_output_token_s"] < 0.09
    assert out["tokens_per_s"] == pytest.approx(out["speed_tokens"] / out["speed_seconds"])
    assert 1 / 0.09 < out["tokens_per_s"] <= 1 / 0.03
    # the parts add up: each prompt's time is its first token plus the rest at the per-token rate
    assert out["speed_seconds"] == pytest.approx(2 * out["time_to_first_token_s"] + 8 * out["time_per_output_token_s"])
    assert beams["speed_tokens"] == 4 and beams["time_to_first_token_s"] >= 0.03
    assert beams["tokens_per_s"] == pytest.approx(4 / beams["speed_seconds"])


def test_fingerprints_recorded_before_the_new_settings_still_match():
    """Settings added later are left out while at their defaults, so an old entry's fingerprint matches."""
    old_dump = {"prompts": None, "data": None, "metrics": ["loss", "perplexity", "checkers", "samples"],
                "checkers": [], "generation": {"max_new_tokens": 64, "temperature": 0.0, "top_k": None,
                                               "top_p": None, "stop": []},
                "limit": 100, "samples": 3, "batch_size": 16}
    expected = hash_json({"settings": old_dump, "loss": "L", "prompts": "P"})
    assert eval_fingerprint(EvalSettings(), "L", "P") == expected
    changed = EvalSettings(generation=GenerationSettings(presence_penalty=0.5))
    assert eval_fingerprint(changed, "L", "P") != expected
    assert eval_fingerprint(EvalSettings(), "L", "P", {"reward_model": "x@1"}) != expected


def test_plan_names_eval_settings_that_cannot_work(tiny_raw_recipe, tmp_path, tmp_registry):
    from align.errors import ConfigError
    from align.pipeline.plan import make_plan
    from align.config.recipe import validate_recipe

    raw = tiny_raw_recipe(tmp_path)
    raw["eval"]["metrics"] = ["reward", "win_rate", "speed"]
    with pytest.raises(ConfigError) as err:
        make_plan(validate_recipe(raw, []), tmp_registry)
    assert "eval.reward_model: metrics reward, win_rate need a judge" in str(err.value)
    raw["eval"]["reward_model"] = "sft"
    raw["eval"]["against"] = "no-such/model"
    with pytest.raises(ConfigError) as err:
        make_plan(validate_recipe(raw, []), tmp_registry)
    assert "eval.reward_model: stage 'sft' is a sft stage, not a reward model" in str(err.value)
    assert "eval.against: " in str(err.value)
