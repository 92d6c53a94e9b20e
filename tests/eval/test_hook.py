"""The evaluation hook: its loss is the token-weighted NLL over labelled tokens (the model's own loss), its
fingerprints of old settings still match, and the plan names eval settings that cannot work."""

from __future__ import annotations

import pytest
import torch

from align.config.recipe import EvalSettings

from align.config.schema import GenerationSettings
from align.data.tokenize import encode_conversation
from align.eval.hook import _mean_nll, eval_fingerprint
from align.models.tiny import make_model, make_tokenizer
from align.registry.fingerprint import hash_json


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
    from align.config.loading import validate_recipe

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
