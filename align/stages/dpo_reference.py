"""DPO's reference log-probs: precomputed once in one pass (sharded over processes, kept in the run folder),
or, when that pass would not leave time to train within the stage's budget, computed per step instead."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import torch

from align.data.sampling import pad_right, pair_chunks
from align.data.tokenize import IGNORE, EncodedPair
from align.models.logprobs import sequence_logps
from align.models.shared_prompt import pair_groups
from align.registry.fingerprint import hash_json
from align.registry.records import write_json_atomic
from align.runtime import distributed
from align.runtime.precision import inference_autocast
from align.stages.context import StageContext

log = logging.getLogger(__name__)


class ReferenceWontFit(Exception):
    """The precomputed reference pass and the training after it would not fit in the stage's budget."""


@torch.no_grad()
def pair_logps(model, pairs: list[EncodedPair], pad_id: int, batch_size: int = 16, keep_going=None) -> torch.Tensor:
    """Summed response log-probs [N, 2] (chosen, rejected) under `model`, `batch_size` rows a pass batched by
    length, each pair's prompt run once, without gradients; bf16 autocast where the hardware has it (the head
    stays fp32). `keep_going(tokens_done, seconds)` may stop the pass by returning False (`ReferenceWontFit`).
    Items without a second side (`rejected` None: KTO's rows without a KL estimate) get NaN in its column."""
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
        done += sum(item_tokens(pairs[i]) for i in chunk)
        paired = all(pairs[i].rejected is not None for i in chunk)
        sides = [pairs[i].chosen for i in chunk] + ([pairs[i].rejected for i in chunk] if paired else [])
        ids, mask = pad_right([s.input_ids for s in sides], pad_id)
        labels, _ = pad_right([s.labels for s in sides], IGNORE)
        with inference_autocast(model):
            sums, _ = sequence_logps(model, ids.to(device), mask.to(device), labels.to(device),
                                     pair_groups(len(ids)) if paired else None)
        if paired:
            out[:, chunk] = sums.double().cpu().view(2, len(chunk))
        else:
            out[0, chunk] = sums.double().cpu()
            out[1, chunk] = math.nan
    model.train(was_training)
    return out.t().contiguous()


def item_tokens(item) -> int:
    """The tokens a reference pass runs for a pair (both sides) or a single row: its share of the pass's time."""
    return len(item.chosen.input_ids) + (len(item.rejected.input_ids) if item.rejected is not None else 0)


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


def can_use_prefix(cfg, model, peft_cfg) -> bool:
    """Whether the reference can come from the frozen prefix: an adapter to switch off, frozen bottom blocks,
    and a decoder stack that can start at a block (`can_split`)."""
    from align.models.logprobs import can_split

    return peft_cfg is not None and bool(cfg.freeze_layers) and can_split(model)


# The share of an epoch below which `auto` takes the reference from the frozen prefix: measured on a 2-core
# CPU (docs/results.md), a step with it costs about 1.5x a step with a precomputed reference (the no-grad top
# blocks cost about as much as their forward with gradients, and the backward only ~1.3x the forward), which
# one precomputed pass over every pair repays after about one epoch.
PREFIX_EPOCHS = 0.5


def frozen_prefix_pays(cfg, model, peft_cfg, train_items: int, run_dir) -> bool:
    """Whether `reference: auto` should take the reference from the frozen prefix (`frozen_prefix`) rather
    than precompute it, for DPO and KTO alike: when training covers under `PREFIX_EPOCHS` of the data, so a
    pass over every item first would mostly serve items never trained. (A time limit that cannot hold the
    precomputed pass and the training switches to the prefix as well: `reference_fits`.) A run folder that
    already holds precomputed (or per-step) reference figures keeps its mode."""
    if cfg.reference != "auto" or not can_use_prefix(cfg, model, peft_cfg):
        return False
    if (run_dir / "reference_logps.pt").is_file() or (run_dir / SWITCHED_FILE).is_file():
        return False
    epochs = cfg.epochs
    if cfg.max_steps:
        epochs = min(epochs, cfg.max_steps * cfg.batch_size * cfg.grad_accum * distributed.world_size()
                     / max(train_items, 1))
    return epochs < PREFIX_EPOCHS


# Training one pair (forward and backward) costs about this many reference passes over it.
TRAIN_PER_REFERENCE = 2.0


SWITCHED_FILE = "reference_mode.json"


def reference_fits(ctx: StageContext, train_tokens: int, total_tokens: int):
    """A `keep_going` for the precomputed reference pass under a time budget: after the first 2% of its tokens,
    project the rest of the pass and the training it leaves time for; when the budget would cut the epoch(s)
    short anyway, the precomputed pass wastes the pairs never trained, and the reference computed per step
    (from the frozen prefix where it can, else with the adapter off) trains more pairs in the same time. The
    projection is per token, not per pair: the pass runs the shortest pairs first (length-sorted), so a rate
    per pair taken at its start would promise a pass several times shorter than it is."""
    budget, epochs = ctx.budget, ctx.config.epochs

    def keep_going(done: int, seconds: float) -> bool:
        if not budget.minutes or done < total_tokens / 50:
            return True
        per_token = seconds / done
        needed = (total_tokens - done) * per_token + TRAIN_PER_REFERENCE * epochs * train_tokens * per_token
        left = budget.minutes * 60 - budget.elapsed() - budget.still_to_come()
        if needed <= left:
            return True
        log.warning("stages.%s: the reference pass (%.0f s left of it) and %.3g epoch(s) of training (about "
                    "%.0f s) would not fit in the %.0f s left of time_limit_minutes; computing the reference "
                    "per step instead, which trains more pairs in that time",
                    ctx.name, (total_tokens - done) * per_token, epochs,
                    TRAIN_PER_REFERENCE * epochs * train_tokens * per_token, left)
        return False

    return keep_going


def switched_mode(run_dir) -> str:
    """The per-step reference a run switched to (`SWITCHED_FILE`): frozen_prefix or adapter_disabled."""
    return json.loads((run_dir / SWITCHED_FILE).read_text()).get("mode", "adapter_disabled")


def reference_logps(ctx: StageContext, model, train, heldout, pad_id: int, fingerprint: dict,
                    may_switch: bool = False, fallback: str = "adapter_disabled") -> dict | None:
    """Reference log-probs for train and held-out pairs, computed once and kept in the run folder (written
    atomically, checked against the run's fingerprint), so a resumed run reuses them. With `may_switch`
    (`reference: auto`, LoRA, one process) and a time budget the pass and training cannot both fit: None,
    recorded in the run folder (with `fallback`, the per-step mode to use: `switched_mode`) so a resumed run
    keeps the per-step reference."""
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
    train_tokens = sum(item_tokens(item) for item in train)
    keep_going = (reference_fits(ctx, train_tokens, train_tokens + sum(item_tokens(item) for item in heldout))
                  if may_switch else None)
    with disabled:
        try:
            train_logps = (pair_logps(model, train, pad_id, ctx.config.batch_size * 2, keep_going) if keep_going
                           else sharded_pair_logps(model, train, pad_id, ctx.config.batch_size * 2))
        except ReferenceWontFit:
            write_json_atomic(switched, {"mode": fallback, "why": "time_limit_minutes"})
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
