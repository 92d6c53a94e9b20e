"""Output parity: does a merged or exported model compute what its source computes?

Why it is built this way:
- The check is on outputs, not weights: logits of a causal LM (scores of a reward model) on a few
  sample inputs (a chat turn rendered with the model's own template, a plain sentence with digits),
  compared with the source's outputs in fp32. Weight-level checks would miss a wrong q/k permutation or
  a dropped score head; outputs do not.
- The tolerance depends on the precision the output is stored in: tight for fp32 (only summation order
  differs), looser for fp16/bf16 and q8_0 (rounding of every weight). It is `atol + rtol * scale`,
  where scale is the largest reference logit, so one setting fits a tiny random model and a real one.
- The figures (max abs diff, top-1 agreement) go into manifests and reports, so a user can judge them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (atol, rtol) per stored precision. Measured on SmolLM2-135M-Instruct with its LoRA adapter merged
# (quickstart/sft@2, logit scale ~40): fp32 merge 1.1e-4; f16 GGUF 0.05 and fp16 HF (fp16 compute) 0.15;
# bf16 GGUF 0.58 and bf16 HF (bf16 compute) 1.4; q8_0 GGUF 1.3 (an in-memory q8_0 round trip of the same
# weights gives the same 1.33). The limits sit 3-8x above those; a wrong q/k order in the same model
# differs by 43, far outside every one of them.
TOLERANCES = {
    "fp32": (1e-4, 2e-5),
    "fp16": (1e-2, 2e-2),
    "bf16": (5e-2, 1e-1),
    "q8_0": (5e-2, 1e-1),
}
PRECISION_ALIASES = {"f32": "fp32", "float32": "fp32", "f16": "fp16", "float16": "fp16", "bfloat16": "bf16"}

SAMPLE_TEXTS = ["The quick brown fox jumps over the lazy dog. 0 1 2 3 12 + 7 = 19",
                "Good answers are helpful, honest and harmless."]
SAMPLE_CHATS = [
    [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19\n#### 19"}],
    [{"role": "user", "content": "Please write a short poem about the sea."}],
]


@dataclass(frozen=True)
class Sample:
    text: str
    ids: list[int]


def sample_texts(tokenizer) -> list[str]:
    """The texts parity is measured on: chat turns in the model's own template, then plain sentences."""
    texts = []
    if getattr(tokenizer, "chat_template", None):
        for chat in SAMPLE_CHATS:
            try:
                texts.append(tokenizer.apply_chat_template(chat, tokenize=False,
                                                           add_generation_prompt=chat[-1]["role"] == "user"))
            except Exception:  # noqa: BLE001 - a template that rejects this conversation: plain text still checks
                continue
    return texts + SAMPLE_TEXTS


def sample_inputs(tokenizer) -> list[Sample]:
    return [Sample(text, tokenizer(text, add_special_tokens=False)["input_ids"]) for text in sample_texts(tokenizer)]


@torch.no_grad()
def model_outputs(model, samples: list[Sample], task: str = "causal") -> list[torch.Tensor]:
    """Per sample: logits [T, V] of a causal LM, or the score [1] of a reward model (its own pooling), in fp32."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for sample in samples:
        ids = torch.tensor([sample.ids], device=device)
        mask = torch.ones_like(ids)
        if task == "classifier":
            from align.rewards.scoring import score_batch

            outputs.append(score_batch(model, ids, mask).float().cpu())
        else:
            outputs.append(model(input_ids=ids, attention_mask=mask).logits[0].float().cpu())
    model.train(was_training)
    return outputs


def precision_name(precision: str) -> str:
    name = PRECISION_ALIASES.get(precision, precision)
    if name not in TOLERANCES:
        raise ValueError(f"no parity tolerance for precision {precision!r} (known: {', '.join(TOLERANCES)})")
    return name


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], precision: str) -> dict:
    """Parity figures of `candidate` against `reference`, and whether they are within the tolerance."""
    atol, rtol = TOLERANCES[precision_name(precision)]
    scale = max(float(r.abs().max()) for r in reference)
    diffs = [float((c - r).abs().max()) for r, c in zip(reference, candidate, strict=True)]
    max_diff = max(diffs)
    tolerance = atol + rtol * scale
    mean_diff = float(torch.cat([(c - r).abs().flatten() for r, c in zip(reference, candidate)]).mean())
    figures = {"precision": precision_name(precision), "max_abs_diff": max_diff, "mean_abs_diff": mean_diff,
               "tolerance": tolerance, "reference_scale": scale, "samples": len(reference)}
    if reference[0].dim() == 2:  # logits: how often the greedy next token agrees
        same = [(c.argmax(-1) == r.argmax(-1)).float() for r, c in zip(reference, candidate)]
        figures["top1_agreement"] = float(torch.cat(same).mean())
    figures["passed"] = bool(max_diff <= tolerance and all(d == d for d in diffs))  # NaN never passes
    return figures


def describe(figures: dict) -> str:
    """`max |diff| 0.000114 (limit 0.0009, fp32), mean 1.2e-05, top-1 agreement 100.0%` for logs and reports."""
    text = (f"max |diff| {figures['max_abs_diff']:.3g} (limit {figures['tolerance']:.3g}, {figures['precision']}), "
            f"mean {figures['mean_abs_diff']:.2g}")
    if "top1_agreement" in figures:
        text += f", top-1 agreement {100 * figures['top1_agreement']:.1f}%"
    return text
