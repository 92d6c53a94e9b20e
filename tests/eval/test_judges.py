"""The hook's judged metrics (`align.eval.judges`): reward is the judge's score of the responses, win rate
against the base (this very model) is one half, a different model is judged prompt by prompt, and a judge
stage with no entry yet skips them."""

from __future__ import annotations

import pytest
import torch

from align.eval.hook import eval_fingerprint, evaluate_model
from align.eval.metrics import distinct_n


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


def test_a_causal_lm_judges_reward_and_win_rate_with_its_rubric(tiny_recipe, tiny_base, tiny_judge, tmp_path,
                                                                 tmp_registry):
    """`eval.judge`: the reward is the generative judge's verdict on each response (computed here on its own),
    win rate against the base (this very model) is one half, and the rubric is part of the fingerprint."""
    from transformers import AutoModelForCausalLM

    from align.data.tokenize import encode_prompt
    from align.eval.hook import load_eval_prompts
    from align.models.generation import generate
    from align.models.loading import ModelSource, load_tokenizer
    from align.rewards.judge import clear_scores, load_generative_judge

    judge = {"judge": str(tiny_judge), "rubric": "Is the answer right?"}
    recipe = tiny_recipe(tmp_path, eval_settings={"metrics": ["reward", "win_rate"], "judge": judge})
    source = ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base))
    tokenizer = load_tokenizer(source, tmp_registry)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    metrics = evaluate_model(recipe, model, tokenizer, registry=tmp_registry)
    assert metrics["win_rate"] == 0.5 and metrics["win_rate_ties"] == 3

    rows, _ = load_eval_prompts(recipe)
    responses = generate(model, tokenizer, [encode_prompt(tokenizer, r["messages"]) for r in rows],
                         recipe.eval.generation)
    clear_scores()
    judge_source = ModelSource(ref=str(tiny_judge), kind="local", path=str(tiny_judge))
    scores = load_generative_judge(judge_source, tmp_registry, judge["rubric"]).score(rows, [g.text for g in responses])
    assert metrics["reward_mean"] == pytest.approx(sum(scores) / 3, abs=1e-4)

    other = tiny_recipe(tmp_path, eval_settings={"metrics": ["reward", "win_rate"],
                                                 "judge": {**judge, "rubric": "Is it short?"}})
    assert evaluate_model(other, model, tokenizer, registry=tmp_registry)["eval_fingerprint"] != \
        metrics["eval_fingerprint"]
