"""What every stage shares: its context, the run folder with resumable checkpoints, and the trainer
callbacks that make a run safe to interrupt.

Lifecycle: setup -> train (resumable) -> save -> evaluate -> register. A run folder
`runs/<recipe>/<stage>/` holds checkpoints and `run.json`, the fingerprint of what the run trains
(config, data, parent, seed). A later run with the same fingerprint resumes from the last complete
checkpoint; a different fingerprint is refused unless `--force`, which starts the run afresh. Once the stage
has registered its entry, `registered.json` names it with the fingerprint: a later run of the same stage is
finished already and reports that entry (unless `--force`, which trains it again from the start).
"""

from __future__ import annotations

import json
import logging
import math
import re
import resource
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from align.pipeline.budget import StageBudget
from align.runtime.distributed import all_max, main_only
from align.errors import TrainingError
from align.registry.fingerprint import hash_json, library_versions, tokenizer_facts
from align.models.loading import ModelSource, load_tokenizer
from align.runtime.precision import mark, stage_precision
from align.eval.plots import training_curve_png
from align.config.recipe import recipe_record
from align.registry.store import Entry, Registry, read_json_record, write_json_atomic
from align.stages.resume import (changed_settings, checkpoint_bytes, checkpoint_problems, free_space_hint,
                                 resumed_step, set_aside, whole_run_loss, write_settings)

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    recipe: object  # align.config.recipe.Recipe
    name: str
    config: object  # the stage's typed config
    registry: Registry
    parent: ModelSource
    runs_root: Path = Path("runs")
    force: bool = False
    continue_run: bool = False  # `--continue`: train a finished run on for more steps (`align.stages.continuing`)
    extra: dict = field(default_factory=dict)
    started: float = field(default_factory=lambda: __import__("time").monotonic())  # the stage's clock

    @property
    def budget(self) -> StageBudget:
        """The stage's end-to-end time budget (`time_limit_minutes`, counted from `started`)."""
        if "budget" not in self.extra:
            self.extra["budget"] = StageBudget(getattr(self.config, "time_limit_minutes", None), started=self.started)
        return self.extra["budget"]

    @property
    def entry_name(self) -> str:
        return f"{self.recipe.name}/{self.name}"

    @property
    def run_dir(self) -> Path:
        return self.runs_root / self.recipe.name / self.name


def base_lineage(ctx: StageContext) -> dict:
    """The root of the lineage: a base entry itself, else whatever base the parent records."""
    entry = ctx.parent.entry
    if entry is None:
        return ctx.parent.lineage()
    if entry.kind == "base":
        return {"source": "registry", "ref": entry.ref}
    return entry.manifest.get("base") or ctx.parent.lineage()


# ------------------------------------------------------------------------------------------ tokenizer


def read_chat_template(value: str, recipe) -> str:
    """A recipe's `chat_template`: template text (it holds `{{` or `{%`), else a path to a file with it."""
    if "{{" in value or "{%" in value:
        return value
    path = recipe.resolve_path(value)
    if not path.is_file():
        raise TrainingError(f"chat_template: {value} is neither a template nor a readable file")
    return path.read_text()


def stage_tokenizer(ctx: StageContext):
    """The parent's tokenizer, with the stage's `chat_template` if it sets one and pad defaulting to EOS.

    Stages after SFT must tokenize exactly as their parent was trained: the tokenizer and chat-template
    hashes are compared with what the parent's manifest recorded (or, for a model outside the registry,
    with its own tokenizer), and a difference is refused, naming both hashes, unless the stage says
    `allow_template_mismatch: true`. SFT may set a new template: that is where a template is chosen."""
    cfg = ctx.config
    tokenizer = load_tokenizer(ctx.parent, ctx.registry)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    entry = ctx.parent.entry
    expected = (entry.manifest.get("tokenizer") if entry is not None else None) or tokenizer_facts(tokenizer)
    if cfg.chat_template is not None:
        tokenizer.chat_template = read_chat_template(cfg.chat_template, ctx.recipe)
    actual = tokenizer_facts(tokenizer)
    differs = [what for what in ("hash", "chat_template_hash") if expected.get(what) != actual.get(what)]
    if differs and cfg.kind != "sft":
        message = (f"stages.{ctx.name}: the tokenizer this stage would use differs from its parent "
                   f"{ctx.parent.describe()}: tokenizer hash {expected.get('hash')} (parent) vs {actual['hash']} "
                   f"(this stage), chat-template hash {expected.get('chat_template_hash')} (parent) vs "
                   f"{actual['chat_template_hash']} (this stage)")
        if not cfg.allow_template_mismatch:
            raise TrainingError(message + ". Token ids or turn markers would not mean what the parent learned; "
                                "use the parent's template, or set allow_template_mismatch: true.")
        log.warning("%s; going on because allow_template_mismatch is set", message)
    elif differs:
        log.info("stages.%s: chat template %s replaces the parent's %s", ctx.name, actual["chat_template_hash"],
                 expected.get("chat_template_hash"))
    return tokenizer


def start_run(ctx: StageContext, prepare):
    """The start every preference stage shares: seed, parent entry, the checked tokenizer, the stage's data
    (`prepare(tokenizer)` -> (train, held-out, report), raising on bad data before any weights load), and
    the run folder keyed by the run's fingerprint. Returns (tokenizer, prepared, config dump, fingerprint,
    (finished entry or None, checkpoint to resume from or None)): see `open_run`."""
    import torch

    from align.models.loading import materialize

    cfg = ctx.config
    torch.manual_seed(cfg.seed)
    ctx.parent = materialize(ctx.parent, ctx.registry)
    tokenizer = stage_tokenizer(ctx)
    prepared = prepare(tokenizer)
    config_dump = cfg.model_dump(by_alias=True)
    fingerprint = {"config": hash_json(config_dump), "data": prepared[2].fingerprint, "seed": cfg.seed,
                   "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                   "parent": ctx.parent.lineage(), "tokenizer": tokenizer_facts(tokenizer)["hash"]}
    return tokenizer, prepared, config_dump, fingerprint, open_run(ctx, fingerprint)


def check_trainable(ctx: StageContext, model) -> tuple[int, int]:
    """(trainable, total) parameters of the stage's model, refused when none would train: such a run fails at
    its first backward pass, or (PPO) registers an untouched copy of its parent as a trained entry."""
    from align.models.loading import count_parameters

    trainable, total = count_parameters(model)
    if trainable == 0:
        raise TrainingError(f"stages.{ctx.name}: method {ctx.config.method} on {ctx.parent.describe()} leaves 0 of "
                            f"{total:,} parameters trainable, so there is nothing to train and nothing is registered")
    return trainable, total


def parent_baseline(ctx: StageContext, model, tokenizer, examples, resume_from: Path | None) -> dict | None:
    """The evaluation hook on the stage's model before its first step, which is the parent (a fresh LoRA adapter
    is the identity; full fine-tuning starts from the parent's weights), measured like the entry will be, so
    the manifest shows the change the stage made. Kept in the run folder: a resumed run compares against the
    same numbers (None when a resumed folder predates that)."""
    from align.runtime.distributed import is_main
    from align.eval.hook import evaluate_model

    import time

    path, timing = ctx.run_dir / "baseline.json", ctx.run_dir / "baseline_seconds.json"
    if resume_from is not None:
        if timing.is_file():  # the evaluation after training is the same work: keep it its time
            ctx.budget.reserve(json.loads(timing.read_text())["seconds"])
        return json.loads(path.read_text()) if path.is_file() else None
    log.info("evaluating the parent before training")
    started = time.monotonic()
    baseline = evaluate_model(ctx.recipe, model, tokenizer, examples)
    seconds = time.monotonic() - started
    ctx.budget.reserve(seconds)
    if is_main():
        write_json_atomic(path, baseline)
        write_json_atomic(timing, {"seconds": round(seconds, 2)})
    return baseline


def baseline_record(ctx: StageContext, baseline: dict | None) -> dict | None:
    """How a manifest records the parent's `baseline`: what was measured and its metrics."""
    return {"of": ctx.parent.lineage(), "metrics": baseline} if baseline else None


# ------------------------------------------------------------------------------------------ models


def build_policy(ctx: StageContext, tokenizer):
    """A causal LM on the parent's weights (adapter parents merged in full precision first, then quantized
    for QLoRA) with a fresh LoRA adapter, or with the bottom `freeze_layers` blocks frozen for full
    fine-tuning; returns (model, LoRA config or None). Shared by the SFT and DPO stages."""
    from align.models.loading import bnb_config, freeze_bottom, load_causal_lm, lora_config, use_attention

    cfg = ctx.config
    precision = stage_precision(cfg)
    log.info("stages.%s precision: %s", ctx.name, precision.describe())
    quant = bnb_config(cfg) if cfg.method == "qlora" else None
    model = use_attention(load_causal_lm(ctx.parent, ctx.registry, dtype=precision.weights, quantization=quant),
                          cfg.attention)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.method == "full":
        freeze_bottom(model, cfg.freeze_layers)
        return mark(model, precision), None
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_cfg = lora_config(cfg.lora, model=model, freeze_layers=cfg.freeze_layers)
    return mark(get_peft_model(model, peft_cfg), precision), peft_cfg


# ------------------------------------------------------------------------------------------ run folder


def prepare_run_dir(run_dir: Path, fingerprint: dict, force: bool, settings: dict | None = None) -> Path | None:
    """Create or reuse the run folder; returns the checkpoint to resume from, or None for a fresh start.
    The fingerprint records the number of processes (`world_size`): checkpoints hold per-process state and
    batch shards, so a run resumes only under as many processes as it started with. `settings` (the stage's
    config values) are kept beside it, so a refused resume names the config keys that changed. Only the main
    process reads and writes the folder; the others wait and get its answer."""
    from align.runtime import distributed

    fingerprint = {**fingerprint, "world_size": distributed.world_size()}
    return distributed.on_main(lambda: _prepare_run_dir(run_dir, fingerprint, force, settings))


def _prepare_run_dir(run_dir: Path, fingerprint: dict, force: bool, settings: dict | None = None) -> Path | None:
    meta = run_dir / "run.json"
    if meta.is_file():
        previous = {"world_size": 1, **json.loads(meta.read_text())}  # folders from before it was recorded
        if previous["world_size"] != fingerprint["world_size"] and not force:
            raise TrainingError(
                f"{run_dir} holds a run started with {previous['world_size']} process(es); its checkpoints resume "
                f"only under the same number, and this run has {fingerprint['world_size']}. Run with --nproc "
                f"{previous['world_size']}, or pass --force to discard it and start afresh.")
        # A part the folder did not record (it predates that part) is not compared: the config hash covers it.
        changed = sorted(k for k in previous if previous.get(k) != fingerprint.get(k))
        keys = changed_settings(run_dir, settings) if "config" in changed else ""
        detail = f" (config: {keys})" if keys else ""
        if changed and not force:
            raise TrainingError(
                f"{run_dir} holds a run with different {', '.join(changed)}{detail}; resuming it would mix two "
                "runs. Pass --force to discard it and start afresh.")
        if changed:
            log.warning("discarding %s (changed: %s%s)", run_dir, ", ".join(changed), detail)
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta, fingerprint)
    write_settings(run_dir, settings)
    return _check_world_size(latest_checkpoint(run_dir, on_damaged=set_aside), fingerprint["world_size"])


FINISHED_FILE = "registered.json"


def open_run(ctx: StageContext, fingerprint: dict) -> tuple[Entry | None, Path | None]:
    """(entry, None) when this very run finished already: its folder recorded the entry it registered, which
    is still in the registry. Re-running it would resume from its last checkpoint, train past its end and
    register a copy, so the stage reports that entry instead. Otherwise (None, checkpoint to resume or None),
    the folder prepared by `prepare_run_dir`; a finished run trains again from the start under `--force`, or
    when its entry is gone from the registry."""
    from align.runtime import distributed

    ref = distributed.on_main(lambda: _finished_ref(ctx, fingerprint))
    if ref is not None:
        entry = ctx.registry.resolve(ref)
        log.info("stages.%s finished already: %s registered %s (config %s); nothing to train (--force trains it "
                 "again)", ctx.name, ctx.run_dir, entry.ref, entry.manifest.get("config_hash"))
        return entry, None
    from align.stages.continuing import continuation, read_continues

    settings = ctx.config.model_dump(by_alias=True)
    checkpoint = distributed.on_main(lambda: continuation(ctx, fingerprint, settings)) if ctx.continue_run else None
    if checkpoint is None:
        checkpoint = prepare_run_dir(ctx.run_dir, fingerprint, ctx.force, settings=settings)
    continues = distributed.on_main(lambda: read_continues(ctx.run_dir))  # also when resuming a continuation
    if continues is not None:
        ctx.extra["continues"] = continues
    return None, checkpoint


def _finished_ref(ctx: StageContext, fingerprint: dict) -> str | None:
    """The ref a finished run of this fingerprint registered; a finished folder that is to train again is
    discarded here. A folder of another fingerprint is left to `prepare_run_dir` (refused, or `--force`)."""
    record = _read_finished(ctx.run_dir)
    if record is None or _without_world(record.get("fingerprint")) != _without_world(fingerprint):
        return None
    entry = ctx.registry.find(record.get("entry", ""))
    if entry is not None and entry.manifest.get("config_hash") == record.get("config_hash") and not ctx.force:
        return entry.ref
    why = "--force" if ctx.force else f"its entry {record.get('entry')} is no longer in registry {ctx.registry.root}"
    log.warning("stages.%s: %s finished before; training it again from the start (%s)", ctx.name, ctx.run_dir, why)
    shutil.rmtree(ctx.run_dir)
    return None


def _read_finished(run_dir: Path) -> dict | None:
    return read_json_record(run_dir / FINISHED_FILE)


def _without_world(fingerprint) -> dict | None:
    """A fingerprint without its process count: a finished run is finished under any number of processes."""
    return {k: v for k, v in fingerprint.items() if k != "world_size"} if isinstance(fingerprint, dict) else None


def record_finished(ctx: StageContext, entry: Entry) -> None:
    """Write `registered.json`: the entry this run registered, its config hash and the run's fingerprint."""
    meta = ctx.run_dir / "run.json"
    fingerprint = json.loads(meta.read_text()) if meta.is_file() else None
    record = {"entry": entry.ref, "config_hash": entry.manifest.get("config_hash"), "fingerprint": fingerprint}
    write_json_atomic(ctx.run_dir / FINISHED_FILE, record)


def latest_checkpoint(run_dir: Path, on_damaged=None) -> Path | None:
    """The newest complete checkpoint whose files are whole. Complete means its `trainer_state.json` parses and
    names its own step: transformers' `Trainer._save_checkpoint` writes that file after the weights, optimizer,
    scheduler and RNG states (PPO writes its checkpoints whole under a hidden name and renames them), so a
    save that crashed midway leaves either no such file or a truncated one, and that folder is passed over.
    Whole means its safetensors, torch and JSON files are not truncated (`align.registry.integrity`): a complete
    checkpoint damaged later is passed over too, for the one before it; `on_damaged(checkpoint, problems)` is
    told (default: a warning naming the files)."""
    found = [(int(m.group(1)), c) for c in run_dir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", c.name))]
    for step, child in sorted(found, reverse=True):
        if not _complete(child, step):
            continue
        problems = checkpoint_problems(child)
        if not problems:
            return child
        if on_damaged is not None:
            on_damaged(child, problems)
        else:
            log.warning("%s is damaged (%s); passing over it", child, "; ".join(problems))
    return None


def _complete(checkpoint: Path, step: int) -> bool:
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        state = None
    complete = isinstance(state, dict) and state.get("global_step") == step
    if not complete:
        log.warning("%s is incomplete (a save was interrupted); passing over it", checkpoint)
    return complete


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------ callbacks


class StopRequest:
    """While entered, SIGTERM/SIGINT only set `requested`: the training loop finishes its step, saves a
    checkpoint and stops. Shared by the `Trainer` callback below and the PPO loop."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("signal %s received: saving a checkpoint after this step", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def safety_callbacks(time_limit: StageBudget | float | None = None):
    """Callbacks for HF/TRL trainers: [graceful stop, time limit]. The graceful stop's `requested` flag
    tells the caller the run was interrupted (SIGTERM/SIGINT: checkpoint saved, stop); the time limit's
    `reached` flag says training ended early at the recipe's `time_limit_minutes` (checkpoint saved, the
    stage then evaluates and registers what it has, and says so in the manifest)."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        """Stops training when the rest of the stage (final evaluation, save, register) would no longer fit
        in its end-to-end budget (`align.pipeline.budget`)."""

        def __init__(self, budget: StageBudget):
            self.budget = budget
            self.reached = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.budget.step_started()

        def on_step_end(self, args, state, control, **kwargs):
            self.budget.step_done()
            over = not self.reached and self.budget.over()
            if all_max(int(over)):  # decided together: a process stopping alone would leave the others waiting
                self.reached = True
                log.warning("time limit of %.1f minutes for the whole stage: stopping training at step %d after "
                            "%.0f s, keeping %.0f s for the evaluation and the entry", self.budget.minutes,
                            state.global_step, self.budget.elapsed(), self.budget.still_to_come())
                control.should_save = True
                control.should_training_stop = True

    class GracefulStop(TrainerCallback):
        """On SIGTERM or SIGINT, finish the current step, save a checkpoint, and stop."""

        def __init__(self):
            self._stop = StopRequest()

        @property
        def requested(self) -> bool:
            return self._stop.requested

        def on_train_begin(self, args, state, control, **kwargs):
            self._stop.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if all_max(int(self.requested)):  # any process signalled: all save, stop and say so
                self._stop.requested = True
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            self.release()

        def release(self):
            self._stop.__exit__(None, None, None)

    class RecordWorldSize(TrainerCallback):
        """Each checkpoint says how many processes wrote it (see `record_world_size`)."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                record_world_size(Path(args.output_dir) / f"checkpoint-{state.global_step}", args.world_size)

    class LogAtSave(TrainerCallback):
        """Log the loss at every save and at the last step (after the callbacks above asked for a save), so a
        checkpoint's log history covers each of its steps and a resumed run's `train_loss` is exact."""

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True

    from align.pipeline.runlog import progress_callback
    from align.stages.continuing import schedule_callback

    budget = time_limit if isinstance(time_limit, StageBudget) else StageBudget(time_limit)
    return [GracefulStop(), TimeLimit(budget), RecordWorldSize(), LogAtSave(), progress_callback(), schedule_callback()]


WORLD_FILE = "world.json"


def record_world_size(checkpoint: Path, world_size: int) -> None:
    """Write the number of processes into a checkpoint folder: its optimizer, RNG and data-order state are
    per process, so `prepare_run_dir` refuses to resume it under another number."""
    if checkpoint.is_dir():
        write_json_atomic(checkpoint / WORLD_FILE, {"world_size": world_size})


def _check_world_size(checkpoint: Path | None, world_size: int) -> Path | None:
    if checkpoint is not None and (checkpoint / WORLD_FILE).is_file():
        saved = json.loads((checkpoint / WORLD_FILE).read_text())["world_size"]
        if saved != world_size:
            raise TrainingError(f"{checkpoint} was written by {saved} process(es) and cannot resume under "
                                f"{world_size}: run with --nproc {saved}, or pass --force to start afresh.")
    return checkpoint


def training_arguments(ctx: StageContext, model, eval_strategy: str, eval_steps: int | None) -> dict:
    """The `TrainingArguments` every stage shares, from its typed config: batch, schedule, checkpoints every
    `save_steps` (two kept), seeds, mixed precision, token counting; CPU unless a GPU is there."""
    import torch

    cfg = ctx.config
    return dict(
        output_dir=str(ctx.run_dir), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
        save_total_limit=2, eval_strategy=eval_strategy, eval_steps=eval_steps, seed=cfg.seed,
        data_seed=cfg.seed, report_to="none", remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0, logging_first_step=True,
        # Several processes: every trainable weight (LoRA, heads, unfrozen blocks) takes part in every step, so
        # DDP need not search the graph for unused ones each step (its default for PEFT models).
        ddp_find_unused_parameters=False, **stage_precision(cfg).trainer_flags(),
        gradient_checkpointing=getattr(cfg, "gradient_checkpointing", False),
        gradient_checkpointing_kwargs={"use_reentrant": False})


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


def check_finite(loss_value: float, step: int) -> None:
    if not math.isfinite(loss_value):
        raise TrainingError(f"loss became {loss_value} at step {step}; stopping before the optimizer step, "
                            "no checkpoint written after it. Lower the learning rate or check the data.")


def lora_targets(peft_cfg) -> str | list[str] | None:
    """The modules a LoRA config adapts, as the manifest records them (sorted names, or `all-linear`)."""
    if peft_cfg is None:
        return None
    targets = peft_cfg.target_modules
    return targets if isinstance(targets, str) else sorted(targets)


def _saved_bytes(model, adapter: bool) -> int:
    """About what saving `model` writes: its trainable weights (an adapter's) or all of them."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not adapter)


@main_only  # the other processes wait, then get the same Entry
def register_entry(ctx: StageContext, kind: str, model, tokenizer, peft_cfg, *, report, config_dump: dict,
                   history: list[dict], timings: dict, metrics: dict, artifact_extra: dict | None = None,
                   adapter_extra: dict | None = None, manifest_extra: dict | None = None, extra_files=()):
    """Save a trained stage as one registry entry (atomically): adapter or full weights, tokenizer, training
    curve, the stage's pictures and other files (`extra_files`: callables given the entry folder), and the
    manifest with its lineage. Every stage registers through here, so every manifest has the same shape."""
    cfg = ctx.config
    with ctx.registry.create(ctx.entry_name, kind) as draft:
        draft.expected_bytes = _saved_bytes(model, adapter=peft_cfg is not None)  # told if the disk fills up
        if peft_cfg is not None:
            model.save_pretrained(draft.path / "adapter")
            artifact = {"type": "adapter", "path": "adapter", "applies_to": ctx.parent.lineage()}
            adapter = {"method": cfg.method, "r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                       **(adapter_extra or {}), "quant": cfg.quant.model_dump() if cfg.method == "qlora" else None}
        else:
            model.save_pretrained(draft.path / "model", safe_serialization=True)
            artifact, adapter = {"type": "full", "path": "model"}, None
        artifact.update(artifact_extra or {})
        tokenizer.save_pretrained(draft.path / "tokenizer")
        training_curve_png(history, draft.path / "training_curve.png", ctx.entry_name)
        for write in extra_files:
            write(draft.path)
        draft.manifest.update({
            "stage": {"name": ctx.name, "kind": cfg.kind},
            "recipe": recipe_record(ctx.recipe),
            "artifact": artifact,
            "parent": ctx.parent.lineage(),
            "base": base_lineage(ctx),
            "adapter": adapter,
            "tokenizer": {"path": "tokenizer", **tokenizer_facts(tokenizer)},
            "data": {"train": report.as_dict()},
            "config": config_dump,
            "config_hash": hash_json(config_dump),
            "metrics": metrics,
            **({"continues": ctx.extra["continues"]} if ctx.extra.get("continues") else {}),
            **(manifest_extra or {}),
            "history": history,
            "timings": timings,
            "versions": library_versions(),
        })
    entry = draft.entry
    log.info("registered %s", entry.ref)
    record_finished(ctx, entry)
    return entry
