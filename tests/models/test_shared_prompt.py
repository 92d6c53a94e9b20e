"""One pass per shared prompt: the states, scores, log-probs and gradients equal the plain per-row pass
(fp32), and rows that do not share a prompt are left to the plain pass."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from align.data.sampling import pad_right
from align.data.tokenize import IGNORE
from align.models.logprobs import causal_parts, sequence_logps
from align.rewards.scoring import score_batch
from align.models.shared_prompt import consecutive_groups, pair_groups, shared_prompt_states
from align.models.tiny import make_model, make_tokenizer


def _lora(model, task_type=None, modules_to_save=None):
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             task_type=task_type, modules_to_save=modules_to_save))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def _pairs():
    """Three pairs, chosen rows then rejected rows, prompts of different lengths, ragged responses."""
    torch.manual_seed(0)
    prompts = [[5, 9, 13, 21, 30], [7, 8, 40], [11, 12, 13, 14, 15, 16, 17]]
    chosen = [p + torch.randint(3, 60, (n,)).tolist() for p, n in zip(prompts, (4, 2, 6))]
    rejected = [p + torch.randint(3, 60, (n,)).tolist() for p, n in zip(prompts, (7, 3, 1))]
    ids, mask = pad_right(chosen + rejected, 0)
    starts = [len(p) for p in prompts] * 2
    labels = ids.clone()
    for row, start in enumerate(starts):
        labels[row, :start] = IGNORE
    labels[mask == 0] = IGNORE
    return ids, mask, labels, starts


def _spy(monkeypatch, module) -> list:
    """Record what the shared pass returned inside `module`, so a test knows it was taken, not skipped."""
    import align.models.shared_prompt as shared

    taken = []

    def wrapped(*args, **kwargs):
        taken.append(shared.shared_prompt_states(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(module, "shared_prompt_states", wrapped)
    return taken


def test_states_equal_the_plain_pass_at_every_attended_position():
    model = _lora(make_model(make_tokenizer("chatml"), seed=1, layers=2))
    trunk, _ = causal_parts(model)
    ids, mask, _, starts = _pairs()
    plain = trunk(input_ids=ids, attention_mask=mask).last_hidden_state
    shared = shared_prompt_states(trunk, ids, mask, starts, pair_groups(len(ids)))
    attended = mask.bool()
    assert torch.allclose(shared[attended], plain[attended], atol=1e-5)
    assert float(shared.detach()[~attended].abs().max()) == 0.0


def test_reward_scores_and_gradients_equal_the_plain_pass(monkeypatch):
    import align.rewards.scoring
    from transformers import LlamaForSequenceClassification

    config = make_model(make_tokenizer("chatml"), layers=2).config
    config.num_labels = 1
    torch.manual_seed(2)
    model = _lora(LlamaForSequenceClassification(config), "SEQ_CLS", ["score"])
    ids, mask, _, starts = _pairs()
    taken = _spy(monkeypatch, align.rewards.scoring)
    grads, scores = [], []
    for groups in (None, pair_groups(len(ids))):
        model.zero_grad()
        out = score_batch(model, ids, mask, torch.tensor(starts), groups)
        (out[:3] - out[3:]).sum().backward()
        scores.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert len(taken) == 1 and taken[0] is not None  # the second pass was the shared one
    assert torch.allclose(scores[0], scores[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-4)


def test_dpo_log_probs_and_gradients_equal_the_plain_pass(monkeypatch):
    import align.models.logprobs

    model = _lora(make_model(make_tokenizer("chatml"), seed=3, layers=2))
    ids, mask, labels, _ = _pairs()
    taken = _spy(monkeypatch, align.models.logprobs)
    sums, grads = [], []
    for groups in (None, pair_groups(len(ids))):
        model.zero_grad()
        logps, counts = sequence_logps(model, ids, mask, labels, groups)
        (logps[:3] - logps[3:]).sum().backward()
        sums.append(logps.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert len(taken) == 1 and taken[0] is not None
    assert counts.tolist() == [4, 2, 6, 7, 3, 1]
    assert torch.allclose(sums[0], sums[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-4)


@pytest.mark.parametrize("spoil", ["prompt differs", "empty response", "uneven groups"])
def test_rows_that_cannot_share_a_pass_are_left_to_the_plain_pass(spoil):
    model = make_model(make_tokenizer("chatml"), seed=1, layers=2)
    trunk, _ = causal_parts(model)
    ids, mask, _, starts = _pairs()
    groups = pair_groups(len(ids))
    if spoil == "prompt differs":
        ids[4, 1] = 59  # the second pair's rejected side has another prompt
    elif spoil == "empty response":
        starts[1] = starts[4] = int(mask[1].sum())  # the second pair's chosen side is all prompt
    else:
        groups = [[0, 3], [1, 4, 2]]
    assert shared_prompt_states(trunk, ids, mask, starts, groups) is None


def test_consecutive_groups():
    assert consecutive_groups(6, 3) == [[0, 1, 2], [3, 4, 5]]
    assert pair_groups(4) == [[0, 2], [1, 3]]


def test_checkpointed_blocks_in_training_leave_rows_to_the_plain_pass():
    model = make_model(make_tokenizer("chatml"), seed=1, layers=2)
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.23 on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trunk, _ = causal_parts(model)
    ids, mask, _, starts = _pairs()
    model.train()
    assert shared_prompt_states(trunk, ids, mask, starts, pair_groups(len(ids))) is None  # no cache kept
    model.eval()
    assert shared_prompt_states(trunk, ids, mask, starts, pair_groups(len(ids))) is not None
