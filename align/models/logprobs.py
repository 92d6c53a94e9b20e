"""Per-sequence log-probabilities of labelled tokens, computing the LM head only where it is needed.

Why our own: preference losses need log p(response | prompt), i.e. the vocabulary projection at response
positions only. Projecting every position (as `model(...).logits` does, and as TRL's fused head does on
devices without Triton, CPUs included) spends most of the head's work on prompt tokens (TRL's
`DPOTrainer` against this path: docs/results.md). The head runs in fp32 even under bf16 autocast: bf16
logits are rounded to ~0.4%, which over a 50-token response is ~0.5 nats of noise in a DPO log-ratio.

Projecting the head ourselves skips whatever the model's own forward does to its logits after the head:
Gemma 2's final softcapping (`cap * tanh(logits / cap)`, `config.final_logit_softcapping`) is applied here
too (`logit_softcap`), or every loss would train, and every log-prob describe, logits the model never
produces.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from align.data.tokenize import IGNORE
from align.models.shared_prompt import consecutive_groups, shared_prompt_states

HEAD_CHUNK = 4096  # positions per head projection; bounds the [positions, vocab] logits held at once


def causal_parts(model):
    """The transformer body and the LM head of a (possibly PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def logit_softcap(model) -> float | None:
    """The cap a (possibly PEFT-wrapped) causal LM's forward puts on its logits after the head (Gemma 2:
    `final_logit_softcapping`), or None."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """`softcap * tanh(logits / softcap)`, as the model's forward computes it; `logits` when there is no cap."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """The LM head's logits of `hidden` [N, H] in fp32, capped as the model's forward caps them."""
    return capped(hidden.float() @ weight.float().t(), softcap)


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 softcap: float | None = None) -> torch.Tensor:
    logits = head_logits(hidden, weight, softcap)
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def head_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               softcap: float | None = None) -> torch.Tensor:
    """log p(target) for each row of `hidden` [N, H]. Long inputs go in chunks whose logits are recomputed in
    the backward pass, so memory stays at one chunk's [HEAD_CHUNK, vocab] whatever the batch. `softcap`: the
    model's `logit_softcap`."""
    if hidden.size(0) <= HEAD_CHUNK:
        return _token_logps(hidden, weight, targets, softcap)
    parts = []
    for start in range(0, hidden.size(0), HEAD_CHUNK):
        stop = start + HEAD_CHUNK
        if torch.is_grad_enabled():
            parts.append(checkpoint(_token_logps, hidden[start:stop], weight, targets[start:stop], softcap,
                                    use_reentrant=False))
        else:
            parts.append(_token_logps(hidden[start:stop], weight, targets[start:stop], softcap))
    return torch.cat(parts)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                   groups: list[list[int]] | None = None, position_ids: torch.Tensor | None = None,
                   prefix: torch.Tensor | None = None, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs of the labelled tokens [B], number of labelled tokens [B]) for right-padded rows.
    `labels` is `input_ids` with unscored positions set to -100; position t is predicted from t - 1.
    `groups`: rows sharing their prompt (the unlabelled start), run once per group where they do
    (`align.models.shared_prompt`; e.g. `pair_groups` for a batch of chosen then rejected rows). `position_ids`
    without an attention mask: packed rows (`align.data.packing`), sums per row, not per conversation.
    `prefix`/`start`: begin at block `start` from the hidden states entering it (`frozen_prefix_states`)."""
    trunk, head = causal_parts(model)
    if prefix is not None:
        with _blocks(trunk, start, None, final_norm=True):
            hidden = _shared_hidden(model, input_ids, attention_mask, labels, groups, prefix) if groups else None
            if hidden is None:
                hidden = trunk(inputs_embeds=prefix, attention_mask=attention_mask).last_hidden_state
    else:
        hidden = _shared_hidden(model, input_ids, attention_mask, labels, groups) if groups else None
    if hidden is None and position_ids is not None:
        hidden = trunk(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    elif hidden is None:
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:].to(hidden.device)
    scored = targets != IGNORE
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        token_logps = head_logps(hidden[:, :-1][scored], head.weight, targets[scored], logit_softcap(model))
    per_position = token_logps.new_zeros(scored.shape).masked_scatter(scored, token_logps)
    return per_position.sum(dim=1), scored.sum(dim=1)


def mean_nll(logp_sum: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of each row."""
    return -logp_sum / counts.clamp(min=1)



def _token_logps_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         temperature: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head_logits(hidden, weight, softcap) / temperature
    normalizer = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(1, targets[:, None]).squeeze(1) - normalizer
    with torch.no_grad():  # entropy is logged, never trained on: no graph for it
        probs = torch.softmax(logits.detach(), dim=-1)
        entropy = normalizer.detach() - (probs * logits.detach()).sum(dim=-1)
    return logps, entropy


# ------------------------------------------------------------------------------------------ frozen prefix
#
# With the bottom blocks frozen (no adapter there), the policy and its adapter-disabled reference compute the
# same hidden states up to the first trainable block. RL runs that prefix once per rollout and starts the
# reference pass, the policy pass and the trained pass from its output: on SmolLM2-135M with 14 of 30 blocks
# frozen that removes about a third of the forward work of a step.

SPLITTABLE = {"llama", "mistral", "qwen2", "qwen3"}  # decoder stacks whose forward takes hidden states as-is


@contextlib.contextmanager
def _blocks(trunk, start: int, stop: int | None, final_norm: bool):
    """Temporarily keep only blocks [start, stop) of a decoder stack (and drop its final norm)."""
    layers, norm = trunk.layers, trunk.norm
    kept = list(layers)[start:stop]
    trunk.layers = torch.nn.ModuleList(kept)
    if not final_norm:
        trunk.norm = torch.nn.Identity()
    # A KV cache is indexed by each attention's `layer_idx`, and its length read at index 0: the kept blocks
    # are numbered from 0 while they run alone (`frozen_prefix_states` shares prompts through a cache).
    numbered = [(m, m.layer_idx) for block in kept for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    for module, index in numbered:
        module.layer_idx = index - start
    try:
        yield
    finally:
        trunk.layers, trunk.norm = layers, norm
        for module, index in numbered:
            module.layer_idx = index


def can_split(model) -> bool:
    trunk, _ = causal_parts(model)
    return (getattr(model.config, "model_type", None) in SPLITTABLE and hasattr(trunk, "layers")
            and hasattr(trunk, "norm"))


def prefix_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, blocks: int) -> torch.Tensor:
    """The hidden states entering block `blocks` (the output of the frozen prefix)."""
    trunk, _ = causal_parts(model)
    with _blocks(trunk, 0, blocks, final_norm=False):
        return trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def frozen_prefix_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                         groups: list[list[int]] | None, blocks: int) -> torch.Tensor:
    """The hidden states entering block `blocks`, for right-padded rows (zeros at padding), each group's
    prompt run once where the rows share it: the frozen bottom blocks' output, the same for a policy and its
    adapter-disabled reference, so both start their top blocks from it (`sequence_logps(prefix=...)`)."""
    trunk, _ = causal_parts(model)
    with _blocks(trunk, 0, blocks, final_norm=False):
        hidden = _shared_hidden(model, input_ids, attention_mask, labels, groups) if groups else None
        if hidden is None:
            hidden = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden


def trunk_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: torch.Tensor | None = None,
                 start: int = 0) -> torch.Tensor:
    """The final hidden states; from `prefix` (hidden states entering block `start`) when given."""
    trunk, _ = causal_parts(model)
    if prefix is None:
        return trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    with _blocks(trunk, start, None, final_norm=True):
        return trunk(inputs_embeds=prefix, attention_mask=attention_mask).last_hidden_state


def labelled_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The final hidden states that predict each labelled token, [N, H] in row-major order of `labels[:, 1:]`."""
    hidden = trunk_hidden(model, input_ids, attention_mask)[:, :-1]
    return hidden[labels[:, 1:].to(hidden.device) != IGNORE]


KL_CHUNK = 256  # positions per exact-KL chunk: two [KL_CHUNK, vocab] fp32 log-softmaxes held at once


def distribution_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
                    temperature: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Exact KL(p || q) at each position [N], summed over the whole vocabulary, between the next-token
    distributions p = softmax(hidden W^T / T) and q = softmax(ref_hidden W_ref^T / T). Unlike the k1
    estimate log p(x) - log q(x) of the sampled token, it has no sampling noise and is never negative (a
    fp32 rounding below zero is clamped), so a mean over a few held-out responses means what it says.
    `softcap`: the models' `logit_softcap` (a policy and its reference share their config)."""
    parts = []
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        for start in range(0, hidden.size(0), KL_CHUNK):
            stop = start + KL_CHUNK
            logp = torch.log_softmax(head_logits(hidden[start:stop], weight, softcap) / temperature, dim=-1)
            logq = torch.log_softmax(head_logits(ref_hidden[start:stop], ref_weight, softcap) / temperature, dim=-1)
            parts.append((logp.exp() * (logp - logq)).sum(dim=-1).clamp_min(0.0))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ shared prompts
#
# RL samples k responses per prompt, and a preference pair's two sides share theirs: teacher-forcing each row
# recomputes the prompt on every row. `align.models.shared_prompt` runs each prompt once; here is how log-probs use it.


def grouped_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   k: int) -> torch.Tensor:
    """`trunk_hidden(...)[:, :-1]` for right-padded prompt + response rows that come in groups of `k`
    consecutive rows sharing one prompt (the unlabelled start of each row); raises ValueError otherwise."""
    hidden = _shared_hidden(model, input_ids, attention_mask, labels, consecutive_groups(input_ids.size(0), k))
    if hidden is None:
        raise ValueError(f"{input_ids.size(0)} rows do not form groups of {k} sharing a prompt, each with a response")
    return hidden[:, :-1]


def _shared_hidden(model, input_ids, attention_mask, labels, groups, states=None) -> torch.Tensor | None:
    trunk, _ = causal_parts(model)
    labelled = labels != IGNORE
    starts = torch.where(labelled.any(dim=1), labelled.int().argmax(dim=1), 0).tolist()  # prompt lengths
    return shared_prompt_states(trunk, input_ids, attention_mask, starts, groups, states)


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                temperature: float = 1.0, value_head=None, prefix: torch.Tensor | None = None,
                start: int = 0, values_only: bool = False, group: int = 1) -> dict[str, torch.Tensor]:
    """Per-position figures for right-padded rows, aligned with `labels[:, 1:]` (shape [B, L - 1], zero where a
    label is -100): `logps` of each labelled token under softmax(logits / temperature) (the distribution a
    sampler at that temperature draws from), its `entropy`, and with a `value_head` the `values` read from the
    hidden state that predicts the token (the state before it is generated). The head is projected at labelled
    positions only, in fp32 chunks (see `head_logps`). `prefix`/`start`: begin at block `start` from the
    frozen prefix's output (`prefix_hidden`). `values_only`: skip the LM head (a critic's pass). `group` > 1:
    rows come in groups of that many sharing a prompt, which runs once per group (`grouped_hidden`)."""
    _, head = causal_parts(model)
    if group > 1:
        hidden = grouped_hidden(model, input_ids, attention_mask, labels, group)
    else:
        hidden = trunk_hidden(model, input_ids, attention_mask, prefix, start)[:, :-1]
    targets = labels[:, 1:].to(hidden.device)
    scored = targets != IGNORE
    picked = hidden[scored]
    out: dict[str, torch.Tensor] = {}
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if value_head is not None:
            values = value_head(picked.to(value_head.weight.dtype)).squeeze(-1).float()
            out["values"] = values.new_zeros(scored.shape).masked_scatter(scored, values)
        if values_only:
            return out
        # As in `head_logps`: past one chunk, logits are recomputed in the backward pass, not kept.
        remat = torch.is_grad_enabled() and picked.size(0) > HEAD_CHUNK
        picked_targets, parts, softcap = targets[scored], [], logit_softcap(model)
        for i in range(0, picked.size(0), HEAD_CHUNK):
            args = (picked[i:i + HEAD_CHUNK], head.weight, picked_targets[i:i + HEAD_CHUNK], temperature, softcap)
            parts.append(checkpoint(_token_logps_entropy, *args, use_reentrant=False) if remat
                         else _token_logps_entropy(*args))
        logps = torch.cat([p[0] for p in parts]) if parts else picked.new_zeros(0)
        entropy = torch.cat([p[1] for p in parts]) if parts else picked.new_zeros(0)
        out["logps"] = logps.new_zeros(scored.shape, dtype=torch.float32).masked_scatter(scored, logps.float())
        out["entropy"] = entropy.new_zeros(scored.shape, dtype=torch.float32).masked_scatter(scored, entropy)
    return out
