"""Reward-model scoring: the one API that PPO, the evaluation hook, `align score` and users call.

A reward model is a one-output sequence classifier. Its score for a conversation is read at the last real
token, found from the attention mask, not from the pad id: with pad == EOS (SmolLM2 and many others)
library pooling by pad id can pick the wrong position. Sequences are right-padded here and tokenized
with the reward entry's own chat template, so any policy's text can be scored.

A registry entry is a reward model when its kind is `reward`; a reward entry that failed its quality gate
is usable for scoring, but PPO refuses it unless the recipe overrides the gate (`gate_problem`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from align.data.sampling import length_sorted_chunks, pad_right, pair_chunks
from align.data.tokenize import IGNORE, EncodedPair, encode_conversation
from align.errors import RegistryError
from align.objectives.ranking import pairwise_accuracy
from align.models.loading import ModelSource, adapter_parent, full_weights_folder, load_sequence_classifier, load_tokenizer
from align.runtime.precision import inference_autocast
from align.registry.store import Registry
from align.models.shared_prompt import pair_groups, shared_prompt_states


# ------------------------------------------------------------------------------------------ forward


def _trunk_and_head(model):
    """The transformer body and the score head of a (possibly PEFT-wrapped) sequence classifier."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.score


POOLINGS = ("last", "mean")


def pooling_of(model) -> str:
    """How a reward model reads its score: `last` attended token (the usual), or `mean` of the response's
    final hidden states. Set on the model by the reward stage and by `load_reward_model` from the entry."""
    return getattr(model, "reward_pooling", "last")


def score_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                starts: torch.Tensor | None = None, groups: list[list[int]] | None = None) -> torch.Tensor:
    """Scores [B] for right-padded sequences. `starts` [B]: where each row's response begins (mean pooling
    averages from there to the last attended token; without it, over the whole sequence). `groups`: rows
    whose first `starts` tokens are the same prompt, run once per group where they are (`align.models.shared_prompt`;
    `pair_groups` for a batch of chosen then rejected rows); the scores are the same."""
    trunk, head = _trunk_and_head(model)
    hidden = None
    if groups and starts is not None:
        hidden = shared_prompt_states(trunk, input_ids, attention_mask, starts.tolist(), groups)
    if hidden is None:
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    if pooling_of(model) == "mean":
        keep = attention_mask.bool()
        if starts is not None:
            positions = torch.arange(hidden.size(1), device=hidden.device)
            keep = keep & (positions[None, :] >= starts.to(hidden.device)[:, None])
        weights = keep.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    else:
        last = attention_mask.sum(dim=-1) - 1
        pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    # The head runs in fp32 even under autocast: bf16 scores would be rounded to ~0.01 and tie.
    dtype = head.weight.dtype if head.weight.dtype.is_floating_point else pooled.dtype  # 4-bit heads: as is
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return head(pooled.to(dtype)).squeeze(-1).float()


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_id: int, batch_size: int = 16,
                    starts: list[int] | None = None) -> list[float]:
    """Scores for token sequences, batched by length (less padding), returned in input order; bf16
    autocast where the hardware has it (see `inference_autocast`)."""
    if not sequences:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = [0.0] * len(sequences)
    for chunk in length_sorted_chunks([len(s) for s in sequences], batch_size):
        ids, mask = pad_right([sequences[i] for i in chunk], pad_id)
        row_starts = torch.tensor([starts[i] for i in chunk]) if starts is not None else None
        with inference_autocast(model):
            values = score_batch(model, ids.to(device), mask.to(device), row_starts)
        for i, value in zip(chunk, values.tolist()):
            scores[i] = value
    model.train(was_training)
    return scores


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16,
                        max_length: int = 1024) -> list[float]:
    """Scores for chat conversations (each ending with the assistant turn to judge). Over-long ones keep
    their end, which holds the response being judged."""
    sequences, starts = [], []
    for messages in conversations:
        last_prompt = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
        encoded = encode_conversation(tokenizer, messages, None, label_from=last_prompt + 1)
        start = next((i for i, x in enumerate(encoded.labels) if x != IGNORE), 0)
        cut = max(len(encoded.input_ids) - max_length, 0)
        sequences.append(encoded.input_ids[cut:])
        starts.append(max(start - cut, 0))
    return score_sequences(model, sequences, tokenizer.pad_token_id, batch_size, starts)


@torch.no_grad()
def score_pairs(model, pairs: list[EncodedPair], pad_id: int, batch_size: int = 16) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) for tokenized preference pairs: `batch_size` rows (half as many pairs)
    a pass, batched by length, each pair's prompt run once."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = torch.zeros(2, len(pairs), dtype=torch.float64)
    for chunk in pair_chunks(pairs, max(batch_size // 2, 1)):
        ids, mask = pad_right([pairs[i].chosen.input_ids for i in chunk] + [pairs[i].rejected.input_ids for i in chunk],
                              pad_id)
        starts = torch.tensor([pairs[i].prompt_tokens for i in chunk] * 2)
        with inference_autocast(model):
            values = score_batch(model, ids.to(device), mask.to(device), starts, pair_groups(len(ids)))
        scores[:, chunk] = values.double().cpu().view(2, len(chunk))
    model.train(was_training)
    return scores[0].tolist(), scores[1].tolist()


def pair_metrics(chosen: list[float], rejected: list[float], tie_tolerance: float = 1e-4) -> dict:
    """The reward quality-gate figures: accuracy, ties, score mean and spread, and the chosen-rejected gap."""
    c, r = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    if c.numel() == 0:
        return {}
    gap = c - r
    both = torch.cat([c, r])
    return {
        "pairwise_accuracy": pairwise_accuracy(c, r),
        "tie_share": float((gap.abs() <= tie_tolerance).double().mean()),
        "score_mean": float(both.mean()),
        "score_std": float(both.std()) if both.numel() > 1 else 0.0,
        "chosen_mean": float(c.mean()),
        "rejected_mean": float(r.mean()),
        "gap_mean": float(gap.mean()),
        "gap_std": float(gap.std()) if gap.numel() > 1 else 0.0,
        "pairs": int(c.numel()),
    }


# ------------------------------------------------------------------------------------------ loading


def reward_problem(source: ModelSource) -> str | None:
    """Why `source` is not a reward model (checked at plan time, no weights loaded), or None."""
    if source.entry is not None:
        if source.entry.kind != "reward":
            return (f"{source.entry.ref} is a {source.entry.kind} entry, not a reward model; "
                    "train one with a `reward` stage")
        return None
    if source.kind in {"local"}:
        config = Path(source.path) / "config.json"
        architectures = json.loads(config.read_text()).get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            return f"{source.path} is not a sequence-classification model (architectures: {architectures})"
        return None
    if source.kind in {"packaged", "gguf"}:
        return f"{source.ref} is a language model, not a reward model"
    return None  # a hub id: checked when it loads


def gate_problem(source: ModelSource) -> str | None:
    """Why a reward entry must not be used for PPO (it failed its quality gate), or None."""
    gate = (source.entry.manifest.get("gate") if source.entry is not None else None) or {}
    if gate and not gate.get("passed", True):
        return (f"{source.entry.ref} failed its quality gate: held-out accuracy {gate.get('accuracy', 0):.3f} < "
                f"min_accuracy {gate.get('min_accuracy')}; set allow_failed_gate: true to use it anyway")
    return None


def load_reward_model(source: ModelSource, registry: Registry, dtype: str = "auto"):
    """(model, tokenizer) for scoring: adapters are merged for speed; the score head comes from the entry."""
    why = reward_problem(source)
    if why:
        raise RegistryError(why)
    tokenizer = load_tokenizer(source, registry)
    entry = source.entry
    if entry is not None and entry.artifact.get("type") == "adapter":
        from peft import PeftModel

        parent = adapter_parent(entry, registry)
        base = load_sequence_classifier(parent, registry, dtype=dtype, pad_token_id=tokenizer.pad_token_id)
        model = PeftModel.from_pretrained(base, str(entry.file(entry.artifact["path"]))).merge_and_unload()
    else:
        folder = str(entry.file(entry.artifact["path"])) if entry is not None else full_weights_folder(source, registry)
        model = load_sequence_classifier(ModelSource(ref=folder, kind="local", path=folder), registry, dtype=dtype,
                                         pad_token_id=tokenizer.pad_token_id)
    model.reward_pooling = (entry.artifact.get("pooling") if entry is not None else None) or "last"
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------------ files


def score_rows(model, tokenizer, rows: list[dict], source: str, batch_size: int = 16,
               max_length: int = 1024) -> tuple[dict, list[dict]]:
    """Score a file's rows: preference pairs (summary = the gate's pair metrics) or single responses
    (`messages`, or `prompt` + `completion`/`response`). Returns (summary, one result per row)."""
    from align.data.formats import load_conversations
    from align.data.preference import detect_preference_shape, load_pairs
    from align.errors import DataError

    if rows and detect_preference_shape(rows[0]):
        pairs = load_pairs(rows, source)
        chosen, rejected = (score_conversations(model, tokenizer, [p.prompt + getattr(p, side) for p in pairs.pairs],
                                                batch_size, max_length) for side in ("chosen", "rejected"))
        summary = pair_metrics(chosen, rejected)
        summary["skipped_rows"] = len(pairs.problems) + len(pairs.identical)
        per_row = [{"row": p.index, "chosen_score": c, "rejected_score": r}
                   for p, c, r in zip(pairs.pairs, chosen, rejected)]
        return summary, per_row
    normalized = [{**row, "completion": row["response"]} if "response" in row and "completion" not in row else row
                  for row in rows]
    conversations = load_conversations(normalized, "auto", source)
    if conversations.problems:
        raise DataError(f"{source}: {len(conversations.problems)} bad row(s), first: {conversations.problems[0]}")
    scores = score_conversations(model, tokenizer, conversations.rows, batch_size, max_length)
    values = torch.tensor(scores, dtype=torch.float64)
    summary = {"rows": len(scores), "score_mean": float(values.mean()),
               "score_std": float(values.std()) if len(scores) > 1 else 0.0,
               "score_min": float(values.min()), "score_max": float(values.max())}
    return summary, [{"row": i, "score": v} for i, v in zip(conversations.kept_index, scores)]
