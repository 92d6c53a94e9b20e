"""What every stage shares: its context, the run folder with resumable checkpoints, and the trainer
callbacks that make a run safe to interrupt.

Lifecycle: setup -> train (resumable) -> save -> evaluate -> register. A run folder
`runs/<recipe>/<stage>/` holds checkpoints and `run.json`, the fingerprint of what the run trains
(config, data, parent, seed). A later run with the same fingerprint resumes from the last complete
checkpoint; a different fingerprint is refused unless `--force`, which starts the run afresh.
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

from align.distributed import all_max, main_only
from align.errors import TrainingError
from align.fingerprint import hash_json, library_versions, tokenizer_facts
from align.models import ModelSource, cpu_has_bf16, load_tokenizer
from align.plots import training_curve_png
from align.registry import Registry, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    recipe: object  # align.recipe.Recipe
    name: str
    config: object  # the stage's typed config
    registry: Registry
    parent: ModelSource
    runs_root: Path = Path("runs")
    force: bool = False
    extra: dict = field(default_factory=dict)

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
    checkpoint to resume from or None)."""
    import torch

    from align.models import materialize

    cfg = ctx.config
    torch.manual_seed(cfg.seed)
    ctx.parent = materialize(ctx.parent, ctx.registry)
    tokenizer = stage_tokenizer(ctx)
    prepared = prepare(tokenizer)
    config_dump = cfg.model_dump(by_alias=True)
    fingerprint = {"config": hash_json(config_dump), "data": prepared[2].fingerprint, "seed": cfg.seed,
                   "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                   "parent": ctx.parent.lineage(), "tokenizer": tokenizer_facts(tokenizer)["hash"]}
    return tokenizer, prepared, config_dump, fingerprint, prepare_run_dir(ctx.run_dir, fingerprint, ctx.force)


# ------------------------------------------------------------------------------------------ models


def build_policy(ctx: StageContext, tokenizer):
    """A causal LM on the parent's weights (adapter parents merged in full precision first, then quantized
    for QLoRA) with a fresh LoRA adapter, or with the bottom `freeze_layers` blocks frozen for full
    fine-tuning; returns (model, LoRA config or None). Shared by the SFT and DPO stages."""
    from align.models import bnb_config, freeze_bottom, load_causal_lm, lora_config, use_attention

    cfg = ctx.config
    quant = bnb_config(cfg.quant) if cfg.method == "qlora" else None
    model = use_attention(load_causal_lm(ctx.parent, ctx.registry, dtype=cfg.dtype, quantization=quant),
                          cfg.attention)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.method == "full":
        freeze_bottom(model, cfg.freeze_layers)
        return model, None
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_cfg = lora_config(cfg.lora, model=model, freeze_layers=cfg.freeze_layers)
    return get_peft_model(model, peft_cfg), peft_cfg


# ------------------------------------------------------------------------------------------ run folder


def prepare_run_dir(run_dir: Path, fingerprint: dict, force: bool) -> Path | None:
    """Create or reuse the run folder; returns the checkpoint to resume from, or None for a fresh start.
    The fingerprint records the number of processes (`world_size`): checkpoints hold per-process state and
    batch shards, so a run resumes only under as many processes as it started with. Only the main process
    reads and writes the folder; the others wait and get its answer."""
    from align import distributed

    fingerprint = {**fingerprint, "world_size": distributed.world_size()}
    return distributed.on_main(lambda: _prepare_run_dir(run_dir, fingerprint, force))


def _prepare_run_dir(run_dir: Path, fingerprint: dict, force: bool) -> Path | None:
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
        if changed and not force:
            raise TrainingError(
                f"{run_dir} holds a run with different {', '.join(changed)}; resuming it would mix two runs. "
                "Pass --force to discard it and start afresh.")
        if changed:
            log.warning("discarding %s (changed: %s)", run_dir, ", ".join(changed))
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta, fingerprint)
    return _check_world_size(latest_checkpoint(run_dir), fingerprint["world_size"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint. Complete means its `trainer_state.json` parses and names its own step:
    transformers' `Trainer._save_checkpoint` writes that file after the weights, optimizer, scheduler and RNG
    states (PPO writes its checkpoints whole under a hidden name and renames them), so a save that crashed
    midway leaves either no such file or a truncated one, and that folder is passed over."""
    best = None
    for child in run_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and (best is None or int(match.group(1)) > best[0]) and _complete(child, int(match.group(1))):
            best = (int(match.group(1)), child)
    return best[1] if best else None


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


def safety_callbacks(time_limit_minutes: float | None = None):
    """Callbacks for HF/TRL trainers: [graceful stop, time limit]. The graceful stop's `requested` flag
    tells the caller the run was interrupted (SIGTERM/SIGINT: checkpoint saved, stop); the time limit's
    `reached` flag says training ended early at the recipe's `time_limit_minutes` (checkpoint saved, the
    stage then evaluates and registers what it has, and says so in the manifest)."""
    import time

    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def __init__(self, minutes: float | None):
            self.seconds = minutes * 60 if minutes else None
            self.reached = False
            self.started = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            over = bool(self.seconds) and not self.reached and time.perf_counter() - self.started > self.seconds
            if all_max(int(over)):  # decided together: a process stopping alone would leave the others waiting
                self.reached = True
                log.warning("time limit of %.1f minutes reached at step %d: saving and finishing",
                            self.seconds / 60, state.global_step)
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

    return [GracefulStop(), TimeLimit(time_limit_minutes), RecordWorldSize()]


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


def mixed_precision_args(setting: str, model) -> dict:
    """`bf16`/`fp16` flags for TrainingArguments. `auto`: bf16 autocast over fp32 master weights where the
    hardware has bf16 (recent GPUs; CPUs with AVX512-BF16/AMX), else plain fp32; weights already loaded in
    bf16 train in bf16."""
    import torch

    weights = next(model.parameters()).dtype
    if setting == "no":
        return {"bf16": weights == torch.bfloat16, "fp16": False}
    if setting == "bf16":
        return {"bf16": True, "fp16": False}
    if setting == "fp16":
        return {"bf16": False, "fp16": True}
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return {"bf16": bf16, "fp16": not bf16}
    return {"bf16": weights == torch.bfloat16 or cpu_has_bf16(), "fp16": False}


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
        ddp_find_unused_parameters=False, **mixed_precision_args(cfg.mixed_precision, model),
        gradient_checkpointing=getattr(cfg, "gradient_checkpointing", False),
        gradient_checkpointing_kwargs={"use_reentrant": False})


def train_and_time(ctx: StageContext, trainer, resume_from: Path | None, callbacks) -> tuple[object, dict]:
    """Run (or resume) training; returns the trainer's result and the timings the manifest records. An
    interrupted run (SIGTERM/SIGINT) raises after its checkpoint, saying how to resume."""
    import time

    import torch

    stopper, time_limit = callbacks[:2]
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stopper.release()  # the previous signal handlers come back even when training raised
    seconds = time.perf_counter() - started
    if stopper.requested:
        raise TrainingError(f"interrupted at step {trainer.state.global_step}; a checkpoint is in {ctx.run_dir}. "
                            "Run the same command again to resume.")
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    args = trainer.args
    timings = {"train_seconds": round(seconds, 2), "train_tokens": tokens,
               "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
               "peak_rss_mb": round(peak_rss_mb(), 1), "steps": trainer.state.global_step,
               "resumed_from": str(resume_from) if resume_from else None,
               "stopped_at_time_limit": time_limit.reached,
               "mixed_precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "no")}
    if torch.cuda.is_available():
        timings["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    log.info("trained %d steps in %.1fs: %s tokens/s, peak RSS %.0f MB", trainer.state.global_step, seconds,
             timings["tokens_per_second"], timings["peak_rss_mb"])
    return result, timings


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


@main_only  # the other processes wait, then get the same Entry
def register_entry(ctx: StageContext, kind: str, model, tokenizer, peft_cfg, *, report, config_dump: dict,
                   history: list[dict], timings: dict, metrics: dict, artifact_extra: dict | None = None,
                   adapter_extra: dict | None = None, manifest_extra: dict | None = None, extra_files=()):
    """Save a trained stage as one registry entry (atomically): adapter or full weights, tokenizer, training
    curve, the stage's pictures and other files (`extra_files`: callables given the entry folder), and the
    manifest with its lineage. Every stage registers through here, so every manifest has the same shape."""
    cfg = ctx.config
    with ctx.registry.create(ctx.entry_name, kind) as draft:
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
            "recipe": {"name": ctx.recipe.name, "source": ctx.recipe.source},
            "artifact": artifact,
            "parent": ctx.parent.lineage(),
            "base": base_lineage(ctx),
            "adapter": adapter,
            "tokenizer": {"path": "tokenizer", **tokenizer_facts(tokenizer)},
            "data": {"train": report.as_dict()},
            "config": config_dump,
            "config_hash": hash_json(config_dump),
            "metrics": metrics,
            **(manifest_extra or {}),
            "history": history,
            "timings": timings,
            "versions": library_versions(),
        })
    entry = draft.entry
    log.info("registered %s", entry.ref)
    return entry
