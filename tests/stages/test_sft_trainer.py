"""Parity of the SFT stage's trainer (`align.stages.sft_trainer`: LM head at labelled positions only, no
gradient checkpointing) with plain TRL `SFTTrainer` (full logits, its default gradient checkpointing): the
same batches in the same order give the same per-step losses, within bf16 autocast noise."""

from __future__ import annotations

import pytest
import torch

from align.data.tokenize import encode_conversation
from align.models.tiny import make_model, make_tokenizer

ROWS = [(3, 4), (1, 2), (5, 6), (7, 1), (2, 2), (9, 3), (4, 4), (6, 1), (8, 2), (3, 3), (5, 5), (1, 7)]
# Per-step loss agreement: fp32 exact up to summation order; under bf16 autocast the plain path's head
# runs in bf16 while ours stays fp32, and the two drift apart slowly through the updates.
TOLERANCE = {"no": 1e-4, "bf16": 2e-2}


def _examples(tokenizer):
    return [encode_conversation(tokenizer, [{"role": "user", "content": f"What is {a} + {b}? Think step by step."},
                                            {"role": "assistant", "content": f"{a} + {b} = {a + b}\n#### {a + b}"}],
                                512) for a, b in ROWS]


def _losses(tmp_path, plain: bool, mixed: str, grad_accum: int = 1, max_pass_tokens: int | None = None,
            batch: int = 2, packing: bool = False, examples=None) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    from align.stages.sft_trainer import SFT_ARGS, make_sft_trainer

    tokenizer = make_tokenizer()
    model = get_peft_model(make_model(tokenizer, seed=0, hidden=64),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    examples = examples(tokenizer) if examples else _examples(tokenizer)
    data = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    args = dict(output_dir=str(tmp_path / ("plain" if plain else "align")), per_device_train_batch_size=batch,
                gradient_accumulation_steps=grad_accum, learning_rate=5e-3, max_steps=5, lr_scheduler_type="constant",
                logging_steps=1, report_to="none", use_cpu=True, seed=0, data_seed=0, save_strategy="no",
                bf16=mixed == "bf16", dataset_kwargs={"skip_prepare_dataset": True}, max_length=512)
    torch.manual_seed(0)
    if plain:
        trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=data, processing_class=tokenizer)
    else:  # the stage's trainer, in the plain trainer's batch order (length grouping off) to compare step by step
        trainer = make_sft_trainer(group_by_length=False, max_pass_tokens=max_pass_tokens, packing=packing, model=model,
                                   args=SFTConfig(**args, **SFT_ARGS),
                                   train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("mixed", ["no", "bf16"])
def test_sft_trainer_losses_match_plain_trl(tmp_path, mixed):
    plain = _losses(tmp_path, plain=True, mixed=mixed)
    ours = _losses(tmp_path, plain=False, mixed=mixed)
    assert len(plain) == len(ours) == 5
    for step, (a, b) in enumerate(zip(plain, ours)):
        assert abs(a - b) <= TOLERANCE[mixed] * max(1.0, abs(a)), (step, plain, ours)


def test_sft_trainer_losses_match_plain_trl_with_grad_accumulation(tmp_path):
    plain = _losses(tmp_path, plain=True, mixed="no", grad_accum=2)
    ours = _losses(tmp_path, plain=False, mixed="no", grad_accum=2)
    assert plain == pytest.approx(ours, rel=TOLERANCE["no"])


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_batches_split_into_passes_give_the_plain_losses(tmp_path, grad_accum, monkeypatch):
    """`max_pass_tokens` under a batch's size: every batch of 4 rows trains in several passes, and the
    per-step losses are plain TRL's (fp32), with and without gradient accumulation."""
    import align.data.passes as passes

    split, counts = passes.split_row_batch, []
    monkeypatch.setattr(passes, "split_row_batch", lambda inputs, budget: counts.append(len(split(inputs, budget)))
                        or split(inputs, budget))
    plain = _losses(tmp_path, plain=True, mixed="no", grad_accum=grad_accum, batch=4)
    ours = _losses(tmp_path, plain=False, mixed="no", grad_accum=grad_accum, batch=4, max_pass_tokens=40)
    assert counts and min(counts) >= 2
    assert len(ours) == 5 and plain == pytest.approx(ours, rel=TOLERANCE["no"])


def _varied_examples(tokenizer):
    """Conversations of quite different lengths, so a batch packs several to a row."""
    return [encode_conversation(tokenizer, [{"role": "user", "content": "What is " + " + ".join(map(str, range(n))) + "?"},
                                            {"role": "assistant", "content": f"#### {sum(range(n))}"}], 512)
            for n in (2, 9, 3, 14, 4, 2, 11, 5, 3, 8, 2, 6)]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_packed_batches_give_the_unpacked_losses(tmp_path, grad_accum, monkeypatch):
    """`packing: true` changes only the layout of each batch: in the same batch order, every step's loss is the
    unpacked run's (fp32), while the batches really were packed several conversations to a row."""
    import align.data.packing as packing

    rows, collate = [], packing.PackedCollator.__call__

    def recording(self, features):
        batch = collate(self, features)
        rows.append((len(features), batch["input_ids"].shape[0]))
        return batch

    monkeypatch.setattr(packing.PackedCollator, "__call__", recording)
    unpacked = _losses(tmp_path, plain=False, mixed="no", grad_accum=grad_accum, batch=4, examples=_varied_examples)
    packed = _losses(tmp_path, plain=False, mixed="no", grad_accum=grad_accum, batch=4, examples=_varied_examples,
                     packing=True)
    assert rows and all(r < n for n, r in rows)
    assert len(packed) == 5 and packed == pytest.approx(unpacked, rel=TOLERANCE["no"])
