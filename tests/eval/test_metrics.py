"""The built-in metrics (`align.eval.metrics`): distinct-n and win rate on known values, and speed on a model
slowed down on purpose."""

from __future__ import annotations

import pytest

from align.config.schema import GenerationSettings
from align.eval.metrics import distinct_n, measure_speed, win_rate


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


# ------------------------------------------------------------------------------------------ user metrics

USER_CODE = '''
def first_letters(ctx):
    return {"first_letter_share": sum(g.text[:1].isalpha() for g in ctx.generations) / len(ctx.generations)}

def starts_with_letter(completion, row):
    return 1.0 if completion[:1].isalpha() else 0.0

def returns_text(ctx):
    return {"verdict": "good"}

def returns_nan(ctx):
    return {"score": float("nan")}

def returns_list(ctx):
    return [1.0]

def raises(ctx):
    return {"x": 1 / 0}

def needs_more(ctx, other):
    return {}
'''


@pytest.fixture
def user_metrics(tmp_path):
    (tmp_path / "user_metrics.py").write_text(USER_CODE)
    return f"{tmp_path / 'user_metrics.py'}"


def test_a_user_metric_and_checker_run_beside_the_built_ins(user_metrics, tiny_base, chatml_tokenizer):
    from transformers import AutoModelForCausalLM

    from align.config.recipe import EvalSettings
    from align.eval.hook import run_metrics

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}]} for i in range(4)]
    settings = EvalSettings(metrics=["checkers", "length", f"{user_metrics}:first_letters"],
                            checkers=[f"{user_metrics}:starts_with_letter"], generation={"max_new_tokens": 6})
    metrics, ctx = run_metrics(model, chatml_tokenizer, settings, rows, [])
    expected = sum(g.text[:1].isalpha() for g in ctx.generations) / 4
    assert metrics["first_letter_share"] == metrics["starts_with_letter_pass_rate"] == pytest.approx(expected)
    assert "response_chars_mean" in metrics  # the built-ins still report
    assert [p["spec"] for p in metrics["eval_plugins"]] == [f"{user_metrics}:starts_with_letter",
                                                            f"{user_metrics}:first_letters"]


@pytest.mark.parametrize("name, message", [
    ("returns_text", "returned 'good' as 'verdict'; it must return a number"),
    ("returns_nan", "returned nan as 'score'; it must return a finite number"),
    ("returns_list", "returned list; it must return a mapping of names to numbers"),
    ("raises", r"raised ZeroDivisionError: division by zero \(at user_metrics.py:\d+\) while evaluating"),
])
def test_a_user_metric_that_fails_or_returns_no_numbers_is_named(name, message, user_metrics):
    from align.eval.metrics import find_metric
    from align.rewards.plugins import PluginError

    with pytest.raises(PluginError, match=f"^metric '{user_metrics}:{name}' {message}"):
        find_metric(f"{user_metrics}:{name}")(object())


def test_a_user_metric_must_take_the_context_alone(user_metrics):
    from align.eval.metrics import find_metric
    from align.rewards.plugins import PluginError

    with pytest.raises(PluginError, match=r"a metric is called as fn\(ctx\).*needs_more\(ctx, other\): missing a "
                                          "required argument: 'other'"):
        find_metric(f"{user_metrics}:needs_more")
