"""Log-probs with shared prompts: running each group's prompt once gives the per-row pass's figures and
gradients."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from align.data.tokenize import IGNORE
from align.models.logprobs import token_logps
from align.rl.rollout import pack
from align.models.tiny import make_model, make_tokenizer


def _rows(k: int):
    torch.manual_seed(0)
    prompts = [[5, 9, 13, 21, 30], [7, 8, 40]]  # two prompts of different lengths
    prompt_ids, responses = [], []
    for prompt in prompts:
        for j in range(k):
            prompt_ids.append(prompt)
            responses.append(torch.randint(3, 60, (2 + (3 * j) % 5,)).tolist())  # ragged responses
    return pack(prompt_ids, responses, pad_id=0)


@pytest.mark.parametrize("k", [2, 3])
def test_grouped_pass_matches_the_per_row_pass(k):
    tokenizer = make_tokenizer("chatml")
    policy = get_peft_model(make_model(tokenizer, seed=1, layers=2),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    ids, mask, labels = _rows(k)
    plain = token_logps(policy, ids, mask, labels, temperature=0.7)
    grouped = token_logps(policy, ids, mask, labels, temperature=0.7, group=k)
    scored = labels[:, 1:] != IGNORE
    assert torch.allclose(grouped["logps"][scored], plain["logps"][scored], atol=1e-5)
    assert torch.allclose(grouped["entropy"], plain["entropy"], atol=1e-5)
    assert float(grouped["logps"].detach()[~scored].abs().max()) == 0.0

    grads = []
    for out in (plain, token_logps(policy, ids, mask, labels, temperature=0.7, group=k)):
        policy.zero_grad()
        out["logps"].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in policy.named_parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4)


def test_rows_that_do_not_share_a_prompt_are_refused():
    tokenizer = make_tokenizer("chatml")
    ids, mask, labels = pack([[5, 6, 7], [5, 6, 8]], [[9, 10], [11]], pad_id=0)
    with pytest.raises(ValueError, match="do not form groups of 2 sharing a prompt"):
        token_logps(make_model(tokenizer), ids, mask, labels, group=2)


def test_exact_kl_matches_the_full_distributions_and_is_never_negative():
    """`distribution_kl` at the labelled positions equals KL(p || q) summed over the vocabulary from the two
    models' full logits (at temperature 0.7), is 0 for a model against itself, and > 0 per position for two
    different models, where the k1 estimate on the same tokens is negative at some positions."""
    from align.models.logprobs import causal_parts, distribution_kl, labelled_hidden

    tokenizer = make_tokenizer("chatml")
    policy, reference = make_model(tokenizer, seed=1, layers=2), make_model(tokenizer, seed=2, layers=2)
    ids, mask, labels = _rows(3)
    scored = labels[:, 1:] != IGNORE
    with torch.no_grad():
        hidden, ref_hidden = (labelled_hidden(m, ids, mask, labels) for m in (policy, reference))
        weight, ref_weight = (causal_parts(m)[1].weight for m in (policy, reference))
        kl = distribution_kl(hidden, weight, ref_hidden, ref_weight, temperature=0.7)
        logp = torch.log_softmax(policy(ids, attention_mask=mask).logits[:, :-1][scored].float() / 0.7, dim=-1)
        logq = torch.log_softmax(reference(ids, attention_mask=mask).logits[:, :-1][scored].float() / 0.7, dim=-1)
        same = distribution_kl(hidden, weight, hidden, weight, temperature=0.7)
        k1 = token_logps(policy, ids, mask, labels, 0.7)["logps"] - token_logps(reference, ids, mask, labels, 0.7)["logps"]
        k1 = k1[scored]
    assert torch.allclose(kl, (logp.exp() * (logp - logq)).sum(-1), atol=1e-5)
    assert float(kl.min()) > 0.0 and float(same.abs().max()) == 0.0
    assert float(k1.min()) < 0.0  # what a k1 mean over few tokens can add up to
