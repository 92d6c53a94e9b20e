"""Rollouts for RL: sample responses with `generate`, then pack prompt + response into tensors for scoring.

Sampling (`align.rl.sampler`: finished responses leave the batch) runs in bf16 autocast where the hardware
multiplies bf16 natively (`align.runtime.precision`; faster, docs/results.md). The policy's log-probs
are then recomputed in one teacher-forced pass (fp32 head), so the sampler's small numeric differences
never enter the PPO ratio: the old log-probs, the reference's and the trained ones come from the same code.
How large those differences are is measured every step (`Rollouts.sampler_logps`, `align.rl.logprob_mismatch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.data.sampling import pad_right
from align.data.tokenize import IGNORE
from align.models.generation import generate, library_only_settings


@dataclass
class Rollouts:
    rows: list[dict]            # the prompt row each response answers (repeated per sample)
    texts: list[str]            # decoded responses, EOS removed
    input_ids: torch.Tensor     # [B, L] prompt + response, right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor        # [B, L] response tokens; -100 on the prompt and padding
    ended: torch.Tensor         # [B] bool: the response ended with EOS (not cut at max_new_tokens)
    # [B, L - 1] like `mask`: the sampler's log-prob of each response token (`align.rl.sampler.sampled_logps`),
    # NaN where it kept none; None when `generate` sampled the step (it keeps none).
    sampler_logps: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """[B, L - 1]: the positions (aligned with `labels[:, 1:]`) that hold a response token."""
        return self.labels[:, 1:] != IGNORE

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, index: list[int]) -> "Rollouts":
        """The rows `index`, in that order."""
        return Rollouts(rows=[self.rows[i] for i in index], texts=[self.texts[i] for i in index],
                        input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
                        labels=self.labels[index], ended=self.ended[index],
                        sampler_logps=None if self.sampler_logps is None else self.sampler_logps[index])


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (input_ids, attention_mask, labels) for prompt + response rows."""
    sequences = [p + r for p, r in zip(prompt_ids, response_ids)]
    labels = [[IGNORE] * len(p) + r for p, r in zip(prompt_ids, response_ids)]
    input_ids, attention_mask = pad_right(sequences, pad_id)
    labels, _ = pad_right(labels, IGNORE)
    return input_ids, attention_mask, labels


def sample_rollouts(model, tokenizer, rows: list[dict], prompt_ids: list[list[int]], settings,
                    batch_size: int, group: int = 1) -> Rollouts:
    """One response per entry of `prompt_ids` (repeat a prompt to sample it several times), from our
    sampling loop (finished rows leave the batch) in batches of `batch_size`, else from `generate` (when the
    settings ask for something only `generate` implements: penalties, min_new_tokens)."""
    from align.runtime.precision import inference_autocast
    from align.rl.sampler import sample

    generated: list = []
    if library_only_settings(settings):
        generated = generate(model, tokenizer, prompt_ids, settings, batch_size, autocast=True)
    else:
        for start in range(0, len(prompt_ids), batch_size):
            with inference_autocast(model):
                part = sample(model, tokenizer, prompt_ids[start:start + batch_size], settings, group)
            if part is None:
                generated = generate(model, tokenizer, prompt_ids, settings, batch_size, autocast=True)
                break
            generated += part
    # An empty response (EOS straight away) still has its EOS token to score; keep at least one token.
    responses = [g.token_ids if g.token_ids else [tokenizer.eos_token_id] for g in generated]
    input_ids, attention_mask, labels = pack(prompt_ids, responses, tokenizer.pad_token_id)
    return Rollouts(rows=rows, texts=[g.text for g in generated], input_ids=input_ids,
                    attention_mask=attention_mask, labels=labels,
                    ended=torch.tensor([g.ended_with_eos for g in generated]),
                    sampler_logps=_sampler_logps(prompt_ids, generated, input_ids.size(1) - 1))


def _sampler_logps(prompt_ids: list[list[int]], generated: list, width: int) -> torch.Tensor | None:
    """[B, width]: each response's sampler log-probs where `Rollouts.mask` has its tokens (the token at
    sequence position p sits at p - 1), NaN elsewhere; None when no response kept any."""
    if all(g.token_logps is None for g in generated):
        return None
    out = torch.full((len(generated), width), float("nan"))
    for row, (prompt, g) in enumerate(zip(prompt_ids, generated)):
        if g.token_logps:
            out[row, len(prompt) - 1: len(prompt) - 1 + len(g.token_logps)] = torch.tensor(g.token_logps)
    return out


def trimmed(rollouts: Rollouts, index: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The rows `index` of a rollout's tensors cut to their own longest sequence (less padding per pass);
    returns (input_ids, attention_mask, labels, width)."""
    mask = rollouts.attention_mask[index]
    width = int(mask.sum(dim=1).max())
    return rollouts.input_ids[index, :width], mask[:, :width], rollouts.labels[index, :width], width
