"""The SFT stage's trainer: TRL's `SFTTrainer` loop with the work it does not need taken out.

Why these changes (profiled with torch.profiler on SmolLM2-135M + LoRA r16 all-linear, GSM8K, batch 4, 2 CPU
cores; docs/results.md has the figures):
- The loss projects the LM head only at labelled positions (`align.models.logprobs.sequence_logps`, fp32 head in
  chunks): prompt tokens need no logits, and TRL's CPU path builds [batch, length, vocab] logits for every
  position, then log-softmax over them and an entropy metric. Same loss definition: summed NLL of the
  labelled tokens over `num_items_in_batch`, as the model's own loss divides it.
- No gradient checkpointing (TRL's `SFTConfig` turns it on by default): on a small model it recomputes a
  third of the work to save memory the labelled-only head saves anyway.
- Batches are grouped by length in an order fixed by seed and epoch (`align.data.sampling`), so padding,
  which a CPU computes like real tokens, mostly goes away; a resumed run replays the same batches.
- A batch over `max_pass_tokens` padded tokens runs as several forward/backward passes of whole rows
  (`align.data.passes`), each pass's summed NLL over the whole batch's labelled tokens, so the gradient is
  the batch's: less activation memory, and on a CPU faster (fresh activations are costly there).
- A non-finite loss stops the run before the optimizer step (no checkpoint ever holds it).
- `packing: true` (`align.data.packing`): each batch's conversations packed several to a row, kept apart by
  their position ids; then batches need no length grouping, so they are drawn in plain seeded random order.
"""

from __future__ import annotations

import torch

from align.models.logprobs import sequence_logps
from align.runtime.distributed import call_through

# TrainingArguments the SFT stage sets on top of the shared ones (see the docstring). Gradient checkpointing
# is the recipe's `gradient_checkpointing` (off by default, where TRL turns it on).
SFT_ARGS: dict = {}


def labelled_nll(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Summed NLL of the labelled tokens of a right-padded batch over `num_items_in_batch` (the labelled tokens
    of the whole accumulated batch, as the Trainer counts them), else over this batch's labelled tokens. Called
    through a DDP/FSDP wrapper's forward when there is one (`align.runtime.distributed.call_through`)."""
    from align.data.packing import model_inputs

    ids, mask, labels, positions = model_inputs(getattr(model, "module", model), inputs)  # packed or padded rows
    logp_sum, counts = call_through(model, sequence_logps, ids, mask, labels, None, positions)
    total = counts.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
    return -logp_sum.sum() / total.to(logp_sum.device).clamp(min=1)


def labelled_count(inputs: dict) -> int:
    """The tokens a batch's loss scores: labels other than -100 after the shift."""
    return int((inputs["labels"][:, 1:] != -100).sum())


def make_sft_trainer(group_by_length: bool = True, max_pass_tokens: int | None = None, packing: bool = False,
                     **kwargs):
    """An `SFTTrainer` with the labelled-only loss, length-grouped batches, batches split into passes over
    `max_pass_tokens` and the non-finite loss stop (TRL is imported here, not at module import). Datasets hold
    pre-tokenized `input_ids` and `labels`. `packing`: batches packed into rows of at most `max_length`
    tokens (`align.data.packing`) in seeded random order; `group_by_length=False` keeps the Trainer's own
    order either way (to compare runs step by step)."""
    from trl import SFTTrainer

    from align.data.packing import PackedCollator
    from align.data.passes import split_row_batch
    from align.stages.callbacks import check_finite
    from align.stages.hf_training import PassesMixin

    class AlignSFTTrainer(PassesMixin, SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            """The batch in one pass, or in passes of whole rows whose losses add up to the batch's: each
            pass divides its summed NLL by the batch's labelled tokens (`num_items_in_batch` when the
            Trainer counts them; else the pass's own count, weighted by its share of the batch's)."""
            chunks = split_row_batch(inputs, self.pass_budget()) if "labels" in inputs else [inputs]
            if num_items_in_batch is not None or len(chunks) == 1:
                weights = [1.0] * len(chunks)
            else:
                labelled = max(labelled_count(inputs), 1)
                weights = [labelled_count(chunk) / labelled for chunk in chunks]
            return self.train_in_passes(model, list(zip(chunks, weights)), num_items_in_batch)

        def _get_train_sampler(self, train_dataset=None):
            from align.data.sampling import LengthGroupedEpochSampler

            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if not group_by_length:
                return super()._get_train_sampler(train_dataset)
            if packing:  # packed batches carry little padding in any order: no need to group them by length
                from align.data.sampling import EpochShuffleSampler

                return EpochShuffleSampler(len(dataset), self.args.seed)
            lengths = [len(ids) for ids in dataset["input_ids"]]
            world = getattr(self.args, "world_size", 1)
            return LengthGroupedEpochSampler(lengths, self.args.train_batch_size * world, self.args.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # The trunk and head are called directly, past the autocast accelerate wraps around
            # model.forward, so mixed precision is entered here.
            with self.accelerator.autocast():
                loss = labelled_nll(model, inputs, num_items_in_batch)
            if model.training:
                loss = loss * self.pass_weight  # one of several passes over the batch (`training_step`)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # `num_items_in_batch` counts every process's tokens and DDP averages gradients over processes:
                # scale back by their number, as transformers' `Trainer.compute_loss` does (1 process: no-op).
                loss = loss * self.accelerator.num_processes
            if model.training:
                check_finite(float(loss.detach().float()), self.state.global_step + 1)
            return (loss, {}) if return_outputs else loss

    if packing and kwargs.get("data_collator") is None:
        kwargs["data_collator"] = PackedCollator(kwargs["processing_class"].pad_token_id, kwargs["args"].max_length)
    trainer = AlignSFTTrainer(**kwargs)
    trainer.max_pass_tokens = max_pass_tokens
    return trainer
