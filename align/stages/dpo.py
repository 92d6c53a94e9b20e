"""DPO stage: direct preference optimisation and its variants, full, LoRA or QLoRA, from a registry ref.

Why it is built this way:
- The loop is transformers' `Trainer` (checkpoints, exact resume, schedules, mixed precision); the losses
  are the pure functions of `align.objectives.losses` (sigmoid, cDPO, IPO, hinge, and the reference-free SimPO and
  ORPO), and log-probabilities come from `align.models.logprobs`, which projects the LM head at response tokens
  only. TRL's `DPOTrainer` was measured first and was several times slower with the same model, adapter and
  reference (docs/results.md), because its fused head scores every position (prompts too) where Triton is
  missing. On a small machine speed is learning quality, so we keep ours.
- The reference: `precomputed` (the default) runs the parent once over train and held-out pairs before
  training, without gradients and length-sorted, and keeps two floats per pair in the run folder, so a
  resumed run does not recompute them and no second model stays in memory. Under several processes the
  pass is split among them and gathered (`sharded_pair_logps`); the main process writes the file. `adapter_disabled` (LoRA and
  QLoRA) evaluates the same weights with the adapter switched off each step; `copy` keeps a frozen copy.
- Data is the reward stage's: the same formats, checks, truncation and report (`align.data.prepare`),
  and the same length-grouped batch order fixed by seed and epoch (`align.data.sampling`).
- The tokenizer must be the parent's (`stage_tokenizer` refuses a different tokenizer or chat template).
- After training, the evaluation hook measures held-out implicit-reward accuracy, the chosen and rejected
  rewards and their margin, and the recipe's shared metrics (loss, perplexity, checkers, samples), and
  writes a histogram of held-out margins.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time

import torch

from align.runtime import distributed
from align.data.prepare import prepare_pairs
from align.data.sampling import pad_right, pair_chunks
from align.data.tokenize import IGNORE, EncodedPair
from align.eval.hook import evaluate_model
from align.registry.fingerprint import hash_json
from align.models.logprobs import mean_nll, sequence_logps
from align.models.shared_prompt import pair_groups
from align.objectives.losses import dpo_loss, orpo_loss, pairwise_accuracy, simpo_loss
from align.runtime.precision import inference_autocast
from align.eval.plots import margin_histogram_png
from align.stages.base import (PairBatchesMixin, StageContext, baseline_record, build_policy, check_finite,
                               check_trainable, lora_targets, parent_baseline, register_entry, safety_callbacks,
                               start_run, train_and_time, training_arguments)
from align.registry.store import write_json_atomic
from align.stages.sharded import trained_model

log = logging.getLogger(__name__)

REFERENCE_FREE = ("simpo", "orpo")


def reference_mode(cfg) -> str | None:
    """How the stage gets reference log-probs: None for reference-free losses."""
    if cfg.loss in REFERENCE_FREE:
        return None
    return "precomputed" if cfg.reference == "auto" else cfg.reference


# ------------------------------------------------------------------------------------------ batches


class PreferenceCollator:
    """Pairs -> one right-padded batch: the B chosen sequences first, then the B rejected ones, with labels
    on the response tokens and, when precomputed, the reference log-probs."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        ids, mask = pad_right([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], self.pad_id)
        labels, _ = pad_right([r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows], IGNORE)
        reference = [r["ref_chosen"] for r in rows] + [r["ref_rejected"] for r in rows]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "reference": torch.tensor(reference, dtype=torch.float32)}


def as_dataset(pairs: list[EncodedPair], reference: torch.Tensor | None):
    from datasets import Dataset

    ref = reference.tolist() if reference is not None else [[math.nan, math.nan]] * len(pairs)
    return Dataset.from_dict({"chosen_ids": [p.chosen.input_ids for p in pairs],
                              "chosen_labels": [p.chosen.labels for p in pairs],
                              "rejected_ids": [p.rejected.input_ids for p in pairs],
                              "rejected_labels": [p.rejected.labels for p in pairs],
                              "ref_chosen": [r[0] for r in ref], "ref_rejected": [r[1] for r in ref],
                              "length": [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]})


# ------------------------------------------------------------------------------------------ reference


class ReferenceWontFit(Exception):
    """The precomputed reference pass and the training after it would not fit in the stage's budget."""


@torch.no_grad()
def pair_logps(model, pairs: list[EncodedPair], pad_id: int, batch_size: int = 16, keep_going=None) -> torch.Tensor:
    """Summed response log-probs [N, 2] (chosen, rejected) under `model`, `batch_size` rows a pass batched by
    length, each pair's prompt run once, without gradients; bf16 autocast where the hardware has it (the head
    stays fp32). `keep_going(pairs_done, seconds)` may stop the pass by returning False (`ReferenceWontFit`)."""
    from tqdm.auto import tqdm

    chunks = pair_chunks(pairs, max(batch_size // 2, 1))
    out = torch.zeros(2, len(pairs), dtype=torch.float64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    started, done = time.perf_counter(), 0
    for chunk in tqdm(chunks, desc="reference log-probs", leave=False, disable=len(chunks) <= 4):
        if keep_going is not None and done and not keep_going(done, time.perf_counter() - started):
            model.train(was_training)
            raise ReferenceWontFit()
        done += len(chunk)
        sides = [pairs[i].chosen for i in chunk] + [pairs[i].rejected for i in chunk]
        ids, mask = pad_right([s.input_ids for s in sides], pad_id)
        labels, _ = pad_right([s.labels for s in sides], IGNORE)
        with inference_autocast(model):
            sums, _ = sequence_logps(model, ids.to(device), mask.to(device), labels.to(device), pair_groups(len(ids)))
        out[:, chunk] = sums.double().cpu().view(2, len(chunk))
    model.train(was_training)
    return out.t().contiguous()


def sharded_pair_logps(model, pairs: list[EncodedPair], pad_id: int, batch_size: int) -> torch.Tensor:
    """`pair_logps` with the pairs dealt out among the processes (every n-th pair each), gathered back in
    order on every process: the reference pass costs 1/n of its single-process time."""
    n, rank = distributed.world_size(), distributed.rank()
    if n == 1:
        return pair_logps(model, pairs, pad_id, batch_size)
    mine = pairs[rank::n]
    part = pair_logps(model, mine, pad_id, batch_size) if mine else torch.zeros(0, 2, dtype=torch.float64)
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for index, shard in enumerate(distributed.gather_objects(part)):
        out[index::n] = shard
    return out


# Training one pair (forward and backward) costs about this many reference passes over it.
TRAIN_PER_REFERENCE = 2.0
SWITCHED_FILE = "reference_mode.json"


def reference_fits(ctx: StageContext, train_pairs: int, total_pairs: int):
    """A `keep_going` for the precomputed reference pass under a time budget: after a few chunks, project the
    rest of the pass and the training it leaves time for; when the budget would cut the epoch(s) short
    anyway, the precomputed pass wastes the pairs never trained, and the reference computed per step
    (`adapter_disabled`, one more no-grad pass per trained pair) trains more pairs in the same time."""
    budget, epochs = ctx.budget, ctx.config.epochs

    def keep_going(done: int, seconds: float) -> bool:
        if not budget.minutes or done < min(total_pairs, max(16, total_pairs // 50)):
            return True
        per_pair = seconds / done
        needed = (total_pairs - done) * per_pair + TRAIN_PER_REFERENCE * epochs * train_pairs * per_pair
        left = budget.minutes * 60 - budget.elapsed() - budget.still_to_come()
        if needed <= left:
            return True
        log.warning("stages.%s: the reference pass (%.0f s left of it) and %.3g epoch(s) of training (about "
                    "%.0f s) would not fit in the %.0f s left of time_limit_minutes; computing the reference "
                    "per step instead (reference: adapter_disabled), which trains more pairs in that time",
                    ctx.name, (total_pairs - done) * per_pair, epochs,
                    TRAIN_PER_REFERENCE * epochs * train_pairs * per_pair, left)
        return False

    return keep_going


def reference_logps(ctx: StageContext, model, train, heldout, pad_id: int, fingerprint: dict,
                    may_switch: bool = False) -> dict | None:
    """Reference log-probs for train and held-out pairs, computed once and kept in the run folder (written
    atomically, checked against the run's fingerprint), so a resumed run reuses them. With `may_switch`
    (`reference: auto`, LoRA, one process) and a time budget the pass and training cannot both fit: None,
    recorded in the run folder so a resumed run keeps the per-step reference."""
    switched = ctx.run_dir / SWITCHED_FILE
    if may_switch and switched.is_file():
        return None
    path = ctx.run_dir / "reference_logps.pt"
    key = hash_json(fingerprint)
    if path.is_file():
        saved = torch.load(path)
        if saved.get("fingerprint") == key and len(saved["train"]) == len(train):
            log.info("reference log-probs: reusing %s", path)
            return saved
    started = time.perf_counter()
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    keep_going = reference_fits(ctx, len(train), len(train) + len(heldout)) if may_switch else None
    with disabled:
        try:
            train_logps = (pair_logps(model, train, pad_id, ctx.config.batch_size * 2, keep_going) if keep_going
                           else sharded_pair_logps(model, train, pad_id, ctx.config.batch_size * 2))
        except ReferenceWontFit:
            write_json_atomic(switched, {"mode": "adapter_disabled", "why": "time_limit_minutes"})
            return None
        saved = {"fingerprint": key, "train": train_logps,
                 "heldout": sharded_pair_logps(model, heldout, pad_id, ctx.config.batch_size * 2)}
    if distributed.is_main():
        partial = path.with_name(path.name + f".partial-{os.getpid()}")
        torch.save(saved, partial)
        os.replace(partial, path)
    distributed.barrier()  # no process reads the file (next run) before it is whole
    log.info("reference log-probs for %d pairs in %.1fs", len(train) + len(heldout), time.perf_counter() - started)
    return saved


# ------------------------------------------------------------------------------------------ loss


def preference_loss(cfg, logp: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None):
    """(loss, chosen reward [B], rejected reward [B]) for one batch of summed log-probs laid out [chosen;
    rejected]. Rewards are the implicit rewards beta * (pi - ref), or for reference-free losses
    beta * mean log-prob (SimPO's reward)."""
    chosen, rejected = logp.chunk(2)
    n_chosen, n_rejected = counts.chunk(2)
    mean_c, mean_r = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
    if cfg.loss == "simpo":
        loss = simpo_loss(mean_c, mean_r, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
        return loss, cfg.beta * mean_c.detach().float(), cfg.beta * mean_r.detach().float()
    if cfg.loss == "orpo":
        loss = orpo_loss(mean_c, mean_r, mean_nll(chosen, n_chosen), cfg.orpo_lambda)
        return loss, cfg.beta * mean_c.detach().float(), cfg.beta * mean_r.detach().float()
    ref_c, ref_r = reference.to(logp.device).chunk(2)
    if cfg.loss == "ipo":  # IPO on per-token means, so beta does not depend on response length
        ref_c, ref_r = ref_c / n_chosen.clamp(min=1), ref_r / n_rejected.clamp(min=1)
        chosen, rejected = mean_c, mean_r
    loss, chosen_reward, rejected_reward = dpo_loss(chosen, rejected, ref_c, ref_r, cfg.beta, cfg.loss,
                                                    cfg.label_smoothing)
    if cfg.rpo_alpha:
        loss = loss + cfg.rpo_alpha * mean_nll(logp.chunk(2)[0], n_chosen).mean()
    return loss, chosen_reward, rejected_reward


def make_trainer(cfg, mode: str | None, ref_model=None, **kwargs):
    """A `Trainer` whose loss is the configured preference loss; batches grouped by length in an order fixed
    by seed and epoch."""
    from transformers import Trainer

    class PreferenceTrainer(PairBatchesMixin, Trainer):
        group_by_length = cfg.group_by_length

        def batch_logps(self, model, inputs):
            # sequence_logps calls the trunk and head directly, past the autocast accelerate wraps around
            # model.forward, so mixed precision is entered here.
            # Through the wrapper's forward under several processes (`distributed.call_through`).
            with self.accelerator.autocast():
                return distributed.call_through(model, sequence_logps, inputs["input_ids"],
                                                inputs["attention_mask"], inputs["labels"],
                                                pair_groups(len(inputs["input_ids"])))  # one prompt pass a pair

        def reference(self, model, inputs):
            if mode in (None, "precomputed"):
                return inputs["reference"]
            with torch.no_grad():
                if mode == "adapter_disabled":  # no gradients: the unwrapped model, outside DDP
                    inner = self.accelerator.unwrap_model(model)
                    with inner.disable_adapter():
                        return self.batch_logps(inner, inputs)[0]
                return self.batch_logps(ref_model, inputs)[0]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            reference = self.reference(model, inputs)
            logp, counts = self.batch_logps(model, inputs)
            loss, chosen, rejected = preference_loss(cfg, logp, counts, reference)
            if model.training:
                check_finite(float(loss.detach()), self.state.global_step + 1)
                self._window.append((float(pairwise_accuracy(chosen, rejected)), float(chosen.mean()),
                                     float(rejected.mean())))
                loss = loss * self.pass_weight  # one of several passes over the batch (`training_step`)
            return (loss, torch.stack([chosen, rejected], dim=-1)) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if self._window and "loss" in logs:  # training figures since the last log line
                n = len(self._window)
                logs["train_accuracy"] = round(sum(w[0] for w in self._window) / n, 4)
                logs["rewards_chosen"] = round(sum(w[1] for w in self._window) / n, 4)
                logs["rewards_rejected"] = round(sum(w[2] for w in self._window) / n, 4)
                logs["rewards_margin"] = round(logs["rewards_chosen"] - logs["rewards_rejected"], 4)
                self._window.clear()
            super().log(logs, *args, **kwargs)

    def accuracy(prediction) -> dict:
        rewards = torch.as_tensor(prediction.predictions)
        return {"accuracy": pairwise_accuracy(rewards[:, 0], rewards[:, 1]),
                "margin": float((rewards[:, 0] - rewards[:, 1]).mean())}

    trainer = PreferenceTrainer(compute_metrics=accuracy, **kwargs)
    trainer.max_pass_tokens = cfg.max_pass_tokens
    trainer._window = []
    return trainer


# ------------------------------------------------------------------------------------------ evaluation


def preference_metrics(cfg, model, pairs: list[EncodedPair], reference: torch.Tensor | None, pad_id: int,
                       batch_size: int) -> tuple[dict, list[float]]:
    """Held-out implicit-reward accuracy (ties count half), chosen and rejected rewards and their margin.
    Returns the metrics and the per-pair margins (for the histogram)."""
    if not pairs:
        return {}, []
    policy = pair_logps(model, pairs, pad_id, batch_size)
    counts = torch.tensor([[p.chosen.trainable, p.rejected.trainable] for p in pairs], dtype=torch.float64)
    if reference is None:  # reference-free: SimPO's reward, beta * mean log-prob
        rewards = cfg.beta * policy / counts.clamp(min=1)
    else:
        rewards = cfg.beta * (policy - reference.double())
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    margin = chosen - rejected
    return {"preference_accuracy": pairwise_accuracy(chosen, rejected),
            "rewards_chosen": float(chosen.mean()), "rewards_rejected": float(rejected.mean()),
            "reward_margin": float(margin.mean()), "reward_margin_std": float(margin.std()) if len(pairs) > 1 else 0.0,
            "logps_chosen": float(policy[:, 0].mean()), "logps_rejected": float(policy[:, 1].mean()),
            "pairs": len(pairs)}, margin.tolist()


# ------------------------------------------------------------------------------------------ run


def run(ctx: StageContext):
    """Train, evaluate and register one DPO entry; returns the registry `Entry`."""
    from transformers import TrainingArguments

    cfg = ctx.config
    tokenizer, (train, heldout, report), config_dump, fingerprint, (finished, resume_from) = start_run(
        ctx, lambda tokenizer: prepare_pairs(ctx.recipe, cfg, tokenizer))
    if finished is not None:
        return finished

    model, peft_cfg = build_policy(ctx, tokenizer)
    trainable, total = check_trainable(ctx, model)
    if torch.cuda.is_available() and cfg.method != "qlora":  # the reference pass runs before the Trainer moves it
        model.to(distributed.device())
    mode = reference_mode(cfg)
    ref_model, reference = None, {"train": None, "heldout": None}
    if mode == "precomputed":
        may_switch = (cfg.reference == "auto" and peft_cfg is not None and distributed.world_size() == 1
                      and not resume_from)
        reference = reference_logps(ctx, model, train, heldout, tokenizer.pad_token_id, fingerprint,
                                    may_switch or (ctx.run_dir / SWITCHED_FILE).is_file())
        if reference is None:
            mode, reference = "adapter_disabled", {"train": None, "heldout": None}
    elif mode == "copy":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if mode in ("adapter_disabled", "copy"):  # for held-out metrics, measured once up front
        with (model.disable_adapter() if mode == "adapter_disabled" else contextlib.nullcontext()):
            reference["heldout"] = sharded_pair_logps(ref_model or model, heldout, tokenizer.pad_token_id,
                                                      cfg.batch_size * 2)
    baseline = parent_baseline(ctx, model, tokenizer, [p.chosen for p in heldout], resume_from)
    log.info("%s: %d train / %d held-out pairs; %s trainable of %s parameters; loss %s, reference %s",
             ctx.entry_name, len(train), len(heldout), f"{trainable:,}", f"{total:,}", cfg.loss, mode or "none")

    args = TrainingArguments(**training_arguments(ctx, model, "steps" if heldout and cfg.eval_steps else "no",
                                                  cfg.eval_steps), label_names=[])
    callbacks = safety_callbacks(ctx.budget)
    trainer = make_trainer(cfg, mode, ref_model, model=model, args=args,
                           train_dataset=as_dataset(train, reference["train"]),
                           eval_dataset=as_dataset(heldout, reference["heldout"]) if heldout else None,
                           data_collator=PreferenceCollator(tokenizer.pad_token_id), callbacks=callbacks)
    result, timings = train_and_time(ctx, trainer, resume_from, callbacks)
    timings["reference"] = mode

    model = trained_model(trainer, lambda: build_policy(ctx, tokenizer)[0])  # None on other processes
    if model is not None:
        model.eval()
    metrics, margins = distributed.on_main(lambda: preference_metrics(
        cfg, model, heldout, reference["heldout"], tokenizer.pad_token_id, cfg.batch_size * 2))
    if metrics:
        log.info("held-out: preference accuracy %.3f, reward margin %.3f (chosen %.3f, rejected %.3f)",
                 metrics["preference_accuracy"], metrics["reward_margin"], metrics["rewards_chosen"],
                 metrics["rewards_rejected"])
    metrics.update(evaluate_model(ctx.recipe, model, tokenizer, [p.chosen for p in heldout]))
    metrics["train_loss"] = result.training_loss
    history = [h for h in trainer.state.log_history if h.get("step", 0) > 0 or "loss" in h]
    return register(ctx, model, tokenizer, peft_cfg, report, config_dump, history, timings, metrics, margins,
                    baseline)


def register(ctx: StageContext, model, tokenizer, peft_cfg, report, config_dump: dict, history: list[dict],
             timings: dict, metrics: dict, margins: list[float], baseline: dict | None):
    title = (f"{ctx.entry_name}: held-out reward margins (accuracy {metrics.get('preference_accuracy', 0):.3f})")
    extra_files = [lambda folder: margin_histogram_png(margins, folder / "margin_histogram.png", title)]
    return register_entry(
        ctx, "policy", model, tokenizer, peft_cfg, report=report, config_dump=config_dump, history=history,
        timings=timings, metrics=metrics, adapter_extra={"targets": lora_targets(peft_cfg)},
        manifest_extra={"baseline": baseline_record(ctx, baseline),
                        "preference": {"loss": ctx.config.loss, "beta": ctx.config.beta,
                                       "reference": reference_mode(ctx.config)}},
        extra_files=extra_files)
