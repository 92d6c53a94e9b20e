"""The generative judge (`align.rewards.judge`): its yes/no and scale scores equal what the model's own logits
give by hand, batching changes no score, duplicates are scored once, its prompt holds the rubric verbatim in
the judge's chat template; the recipe's `judge` key is one of the exactly-one reward sources, left out of
old dumps, and the plan names a bad judge by its YAML path before any weights load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.config.loading import validate_recipe
from align.config.schema import RewardSource
from align.errors import ConfigError
from align.pipeline.plan import make_plan
from align.registry.store import Registry
from align.rewards.judge import (
    GenerativeJudge,
    JudgeError,
    JudgeModel,
    clear_scores,
    conversation_text,
    judge_ids,
    scale_ids,
    tokenizer_problem,
)
from align.runtime.precision import MARK
from tests.conftest import write_jsonl

RUBRIC = "Is the response {helpful}, correct and concise?"  # braces and all: the rubric goes in verbatim
PROMPTS = [[{"role": "user", "content": "What is 2 + 2?"}],
           [{"role": "user", "content": "Say hello."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a short poem about the sea."}]]
RESPONSES = ["4", "Hello there, how can I help you today?", "The sea is blue. The quick brown fox jumps over it."]


@pytest.fixture(scope="module")
def weights(tiny_judge):
    """The tiny judge in fp32 (no-grad passes marked fp32, so the by-hand forward pass is the same arithmetic)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_judge).eval()
    setattr(model, MARK, "fp32")
    return JudgeModel("tiny-judge", model, AutoTokenizer.from_pretrained(tiny_judge))


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_scores()
    yield
    clear_scores()


def next_token_logprobs(weights, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = weights.model(torch.tensor([ids])).logits[0, -1].double()
    return torch.log_softmax(logits, dim=-1)


def one_token_ids(tokenizer, forms) -> list[int]:
    ids = [tokenizer.encode(f, add_special_tokens=False) for f in forms]
    return [i[0] for i in ids if len(i) == 1]


def rows(prompts):
    return [{"messages": m} for m in prompts]


def test_yes_no_is_the_log_odds_of_yes_over_no_from_the_models_own_next_token(weights):
    judge = GenerativeJudge(weights, RUBRIC, "yes_no")
    tokenizer = weights.tokenizer
    yes, no = one_token_ids(tokenizer, ["Yes", "yes"]), one_token_ids(tokenizer, ["No", "no"])
    assert len(yes) == len(no) == 2  # both spellings of each, summed
    scores = judge.score(rows(PROMPTS), RESPONSES)
    for messages, response, score in zip(PROMPTS, RESPONSES, scores):
        logp = next_token_logprobs(weights, judge.encode(messages, response))
        expected = torch.logsumexp(logp[yes], 0) - torch.logsumexp(logp[no], 0)
        assert score == pytest.approx(float(expected), abs=1e-4)
    assert len({round(s, 6) for s in scores}) == 3  # each response its own verdict


def test_scale_is_the_expected_rating_over_the_digit_tokens(weights):
    judge = GenerativeJudge(weights, RUBRIC, "scale")
    tokenizer = weights.tokenizer
    assert judge.values == list(range(1, 11))  # this tokenizer has "10" as one token
    scores = judge.score(rows(PROMPTS), RESPONSES)
    for messages, response, score in zip(PROMPTS, RESPONSES, scores):
        probs = next_token_logprobs(weights, judge.encode(messages, response)).exp()
        mass = torch.stack([probs[one_token_ids(tokenizer, [str(k), f" {k}"])].sum() for k in range(1, 11)])
        expected = float((mass * torch.arange(1, 11, dtype=mass.dtype)).sum() / mass.sum())
        assert score == pytest.approx(expected, abs=1e-4) and 1 <= score <= 10
    assert "Rate from 1 to 10. Answer with the number only." in tokenizer.decode(judge.encode(PROMPTS[0], "4"))


def test_a_tokenizer_that_splits_10_rates_from_1_to_9(chatml_tokenizer):
    """Where "10" is two tokens its first is "1": read as a rating it would score a 10 as 1, so the question
    asks for 1 to 9 instead; and a tokenizer without one-token Yes/No cannot give a yes/no verdict."""
    assert list(scale_ids(chatml_tokenizer)) == list(range(1, 10))
    judge = GenerativeJudge(JudgeModel("t", None, chatml_tokenizer), RUBRIC, "scale")
    assert "Rate from 1 to 9." in chatml_tokenizer.decode(judge.encode(PROMPTS[0], "4"))
    assert "judge_score: scale" in tokenizer_problem(chatml_tokenizer, "yes_no")
    with pytest.raises(JudgeError, match="Yes and No"):
        GenerativeJudge(JudgeModel("t", None, chatml_tokenizer), RUBRIC, "yes_no")


def test_the_prompt_holds_rubric_prompt_and_response_in_the_judges_chat_template(weights):
    tokenizer = weights.tokenizer
    text = tokenizer.decode(GenerativeJudge(weights, RUBRIC, "yes_no").encode(PROMPTS[2], RESPONSES[2]))
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert f"Rubric: {RUBRIC}\n" in text and RESPONSES[2] in text and "Answer Yes or No." in text
    assert "System: Be brief.\nUser: Write a short poem about the sea." in text
    assert conversation_text(PROMPTS[0]) == "What is 2 + 2?"
    plain = weights.tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None  # no template: the plain text, then "Answer:"
    assert plain.decode(judge_ids(plain, "Is it good?")).endswith("Is it good?\n\nAnswer:")


def test_batches_of_different_lengths_score_as_one_row_at_a_time(weights):
    prompts = PROMPTS + [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "What is 12 + 7?"}]]
    responses = RESPONSES + ["Hello", "The answer is 19. " * 4]
    alone = GenerativeJudge(weights, RUBRIC, "yes_no", batch_size=1).score(rows(prompts), responses)
    clear_scores()
    batched = GenerativeJudge(weights, RUBRIC, "yes_no", batch_size=3)
    assert batched.score(rows(prompts), responses) == pytest.approx(alone, abs=1e-5)
    assert batched.forward_passes == 2


def test_duplicates_are_scored_once_and_cached_for_the_run(weights):
    counted = []
    hook = weights.model.model.register_forward_hook(lambda m, args, kwargs, out: counted.append(
        kwargs["input_ids"].size(0)), with_kwargs=True)
    try:
        judge = GenerativeJudge(weights, RUBRIC, "yes_no", batch_size=8)
        group = rows([PROMPTS[0]] * 6)  # a GRPO group: one prompt, six samples, three distinct answers
        first = judge.score(group, ["4", "5", "4", "4", "four", "5"])
        assert counted == [3] and first[0] == first[2] == first[3] and first[1] == first[5]
        again = GenerativeJudge(weights, RUBRIC, "yes_no").score(group[:2], ["four", "4"])
        assert counted == [3] and again == [first[4], first[0]]  # the eval hook's judge hits the same cache
        GenerativeJudge(weights, "Is it short?", "yes_no").score(group[:1], ["4"])
        assert counted == [3, 1]  # another rubric is another verdict
    finally:
        hook.remove()


def test_no_grad_passes_follow_the_machines_precision(weights):
    """Marked bf16 (as a stage on a CPU with native bf16 marks its models), the trunk runs under bf16
    autocast; the head stays fp32, so the verdicts stay close to the fp32 ones."""
    fp32 = GenerativeJudge(weights, RUBRIC, "yes_no").score(rows(PROMPTS), RESPONSES)
    clear_scores()
    setattr(weights.model, MARK, "bf16")
    try:
        half = GenerativeJudge(weights, RUBRIC, "yes_no").score(rows(PROMPTS), RESPONSES)
    finally:
        setattr(weights.model, MARK, "fp32")
    assert half != fp32 and half == pytest.approx(fp32, abs=0.05)


# ------------------------------------------------------------------------------------------ config, plan


def test_judge_is_one_of_the_exactly_one_sources_and_old_dumps_are_unchanged():
    with pytest.raises(ValueError, match=r"exactly one of `model`.*`judge`.*got model and judge"):
        RewardSource(model="rm", judge="lm", rubric="ok?")
    assert RewardSource(checker="math_answer").model_dump() == {"model": None, "checker": "math_answer",
                                                                "weight": 1.0, "args": {}}
    source = RewardSource(judge="lm", rubric="Helpful?", judge_score="scale")
    assert {"judge": "lm", "rubric": "Helpful?", "judge_score": "scale"}.items() <= source.model_dump().items()


def _ppo_raw(tmp_path, base, rewards: list[dict], eval_settings: dict | None = None, extra_stages=None) -> dict:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 + 1?"}, {"prompt": "Say hi."}])
    return {"name": "tiny", "base": str(base), "eval": eval_settings or {},
            "stages": {**(extra_stages or {}), "ppo": {"from": "base", "prompts": str(prompts), "rewards": rewards}}}


def _problems(raw, tmp_path, registry=None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        make_plan(validate_recipe(raw, [], source=str(tmp_path / "r.yaml")), registry or Registry(tmp_path / "reg"))
    return {p.where: p.message for p in info.value.problems}


def test_schema_names_a_judge_without_rubric_an_empty_rubric_and_an_unknown_mode(tmp_path, tiny_base):
    raw = _ppo_raw(tmp_path, tiny_base, [{"judge": "x"}, {"judge": "x", "rubric": "  "},
                                         {"judge": "x", "rubric": "ok?", "judge_score": "likert"},
                                         {"checker": "math_answer", "rubric": "ok?"}],
                   {"reward_model": "rm", "judge": {"judge": "x", "rubric": "ok?"}})
    with pytest.raises(ConfigError) as info:
        validate_recipe(raw, [])
    problems = {p.where: p.message for p in info.value.problems}
    assert "a `judge` needs a `rubric`" in problems["stages.ppo.rewards[0]"]
    assert "the rubric is empty" in problems["stages.ppo.rewards[1].rubric"]
    assert "'yes_no' or 'scale'" in problems["stages.ppo.rewards[2].judge_score"]
    assert "rubric applies to `judge` sources only" in problems["stages.ppo.rewards[3]"]
    assert "give one judge" in problems["eval"]


def test_plan_names_bad_judges_by_their_yaml_path(tmp_path, tiny_base, tiny_judge, tiny_reward):
    registry = Registry(tmp_path / "reg")
    reward = tiny_reward(registry)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    raw = _ppo_raw(tmp_path, tiny_base, [
        {"judge": reward.ref, "rubric": "ok?"},                       # a reward entry given as judge
        {"judge": "rm", "rubric": "ok?"},                             # a reward stage given as judge
        {"judge": "tiny/nowhere@3", "rubric": "ok?"},                 # not found
        {"judge": str(tiny_base), "rubric": "ok?"},                   # no one-token Yes/No in its tokenizer
        {"judge": str(tiny_judge), "rubric": "ok?", "args": {"batch": 4}}],
        {"metrics": ["reward"], "prompts": str(tmp_path / "prompts.jsonl"),
         "judge": {"judge": reward.ref, "rubric": "ok?"}},
        extra_stages={"rm": {"kind": "reward", "from": "base", "data": str(prefs)}})
    problems = _problems(raw, tmp_path, registry)
    assert "is a reward model, not a causal LM; use `model:` instead" in problems["stages.ppo.rewards[0].judge"]
    assert "is a reward stage, not a causal LM" in problems["stages.ppo.rewards[1].judge"]
    assert "tiny/nowhere" in problems["stages.ppo.rewards[2].judge"]
    assert "judge_score: scale" in problems["stages.ppo.rewards[3].judge_score"]
    assert "batch_size" in problems["stages.ppo.rewards[4].args"]
    assert "use `eval.reward_model` instead" in problems["eval.judge.judge"]


def test_a_good_judge_plans_with_a_note(tmp_path, tiny_base, tiny_judge):
    raw = _ppo_raw(tmp_path, tiny_base, [{"judge": str(tiny_judge), "rubric": "ok?", "judge_score": "scale"},
                                         {"checker": "regex", "args": {"pattern": "1"}}])
    text = make_plan(validate_recipe(raw, [], source=str(tmp_path / "r.yaml")), Registry(tmp_path / "reg")).describe()
    assert f"judge: local model at {tiny_judge} (scale)" in text
