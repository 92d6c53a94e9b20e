"""The part of a stage that trains through a transformers `Trainer` (SFT, reward, DPO): its shared
arguments, training with timings, a full disk told as such, and batches split into passes.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

from align.errors import TrainingError
from align.runtime.precision import stage_precision
from align.stages.callbacks import console_step_lines
from align.stages.context import StageContext
from align.stages.resume import checkpoint_bytes, free_space_hint, resumed_step, whole_run_loss

log = logging.getLogger(__name__)


def training_arguments(ctx: StageContext, model, eval_strategy: str, eval_steps: int | None) -> dict:
    """The `TrainingArguments` every stage shares, from its typed config: batch, schedule, checkpoints every
    `save_steps` (two kept), seeds, mixed precision, token counting; CPU unless a GPU is there."""
    import torch

    from align.models.renamed_arguments import checkpointing_arguments

    cfg = ctx.config
    return dict(
        output_dir=str(ctx.run_dir), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        lr_scheduler_type=cfg.scheduler, warmup_steps=warmup_share(cfg.warmup_ratio),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
        save_total_limit=2, eval_strategy=eval_strategy, eval_steps=eval_steps, seed=cfg.seed,
        # `report` logs through the stage's own tracker (`align.stages.callbacks.tracking_callbacks`), not
        # `report_to`: transformers' callbacks open their runs themselves (TensorBoard under
        # output_dir/runs/<time>/, W&B and MLflow from environment variables), a new one on each resume.
        data_seed=cfg.seed, report_to="none", remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0, logging_first_step=True,
        # Several processes: every trainable weight (LoRA, heads, unfrozen blocks) takes part in every step, so
        # DDP need not search the graph for unused ones each step (its default for PEFT models).
        ddp_find_unused_parameters=False, **stage_precision(cfg).trainer_flags(),
        **checkpointing_arguments(getattr(cfg, "gradient_checkpointing", False)))  # transformers' current names


def train_and_time(ctx: StageContext, trainer, resume_from: Path | None, callbacks) -> tuple[object, dict]:
    """Run (or resume) training; returns the trainer's result and the timings the manifest records. An
    interrupted run (SIGTERM/SIGINT) raises after its checkpoint, saying how to resume."""
    import time

    import torch

    stopper, time_limit = callbacks[:2]
    time_limit.budget.heldout_rows = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
    time_limit.budget.rows_per_step = (trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
                                       * max(1, trainer.args.world_size))
    resumed_at = resumed_step(resume_from)  # read now: the Trainer's rotation may delete that checkpoint
    console_step_lines(trainer)
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except Exception as err:
        _raise_if_disk_full(err, ctx, trainer)
        raise
    finally:
        stopper.release()  # the previous signal handlers come back even when training raised
    seconds = time.perf_counter() - started
    from align.stages.continuing import trained_nothing

    trained_nothing(ctx, resumed_at, trainer.state.global_step)
    # Trainer's mean covers this process's steps only (0.0 resuming from the last checkpoint): the whole run's.
    result = result._replace(training_loss=whole_run_loss(trainer.state.log_history, resumed_at,
                                                          trainer.state.global_step, result.training_loss))
    if stopper.requested:
        raise TrainingError(f"interrupted at step {trainer.state.global_step}; a checkpoint is in {ctx.run_dir}. "
                            "Run the same command again to resume.")
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    args = trainer.args
    timings = {"train_seconds": round(seconds, 2), "train_tokens": tokens,
               "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
               "peak_rss_mb": round(peak_rss_mb(), 1), "steps": trainer.state.global_step,
               "resumed_from": str(resume_from) if resume_from else None,
               "stopped_at_time_limit": time_limit.reached, "budget": time_limit.budget.describe(),
               "mixed_precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "no")}
    if torch.cuda.is_available():
        timings["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    log.info("trained %d steps in %.1fs: %s tokens/s, peak RSS %.0f MB", trainer.state.global_step, seconds,
             timings["tokens_per_second"], timings["peak_rss_mb"])
    return result, timings


def _raise_if_disk_full(err: Exception, ctx: StageContext, trainer) -> None:
    """A checkpoint save that found the disk full becomes one error naming the checkpoint, the space it
    needs and free, and the last complete checkpoint (intact: the failed save never touches it)."""
    from align.runtime.diskspace import disk_full_error, is_disk_full

    try:
        needed = checkpoint_bytes(ctx.run_dir, trainer.model)
    except Exception:  # noqa: BLE001 - a figure for the message only
        needed = None
    if is_disk_full(err, ctx.run_dir, needed):
        path = ctx.run_dir / f"checkpoint-{trainer.state.global_step}"
        raise disk_full_error(path, needed, free_space_hint(ctx.run_dir), err) from err


class PassesMixin:
    """For `Trainer` subclasses that may run one optimizer step's batch as several forward/backward passes
    (`align.data.passes`): `compute_loss` multiplies its training loss by `pass_weight`, this pass's share
    of the batch, so the passes' gradients add up to the batch's."""

    max_pass_tokens: int | None = None  # the stage's `max_pass_tokens`: split bigger batches into passes
    pass_weight = 1.0

    def pass_budget(self) -> int | None:
        """`max_pass_tokens`, or None under several processes: each must make the same number of backward
        passes, so there the batch stays whole."""
        return self.max_pass_tokens if self.args.world_size == 1 else None

    def train_in_passes(self, model, passes: list[tuple[dict, float]], num_items_in_batch=None):
        """The Trainer's own `training_step` on each (inputs, weight) pass; the summed loss."""
        total = 0.0
        try:
            for chunk, weight in passes:
                self.pass_weight = weight
                total = total + super().training_step(model, chunk, num_items_in_batch)
        finally:
            self.pass_weight = 1.0
        return total


class PairBatchesMixin(PassesMixin):
    """For `Trainer` subclasses over preference pairs (reward, DPO): training batches grouped by length in an
    order fixed by seed and epoch (`align.data.sampling`), unless `group_by_length` is False; and evaluation
    steps that return the loss with the (chosen, rejected) values `compute_loss(return_outputs=True)` gives."""

    group_by_length = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One optimizer step's gradients in one pass, or, for a batch over `max_pass_tokens` padded tokens,
        in several passes of whole pairs, each weighted by its share of the pairs."""
        from align.data.passes import split_pair_batch

        return self.train_in_passes(model, split_pair_batch(inputs, self.pass_budget()), num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        from align.data.sampling import LengthGroupedEpochSampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        # Grouped by the global batch (every process's share of one step), so the order of examples, and
        # which step each one lands in, is the same under any number of processes; accelerate then hands
        # each process its own slice of every global batch.
        return LengthGroupedEpochSampler(dataset["length"], self.args.train_batch_size * self.args.world_size,
                                         self.args.seed)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        import torch

        with torch.no_grad(), self.compute_loss_context_manager():
            loss, values = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), values.detach().float(), None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def warmup_share(ratio: float) -> float:
    """`warmup_ratio` as transformers 5 takes it: `warmup_steps` reads a value below 1 as a share of the
    training steps (it has no `warmup_ratio` any more), and 1 or more as a step count. The recipe keeps
    `warmup_ratio` in [0, 1), so it is always read as the share it means."""
    if not 0 <= ratio < 1:
        raise ValueError(f"warmup_ratio {ratio} must be in [0, 1): transformers would read it as a step count")
    return float(ratio)
