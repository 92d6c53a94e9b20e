"""One lifecycle for every stage kind: prepare -> build -> train -> measure -> register.

`Stage.run` is the template every kind shares: seed, parent and checked tokenizer, the data (bad data fails
here, before any weights load), the run folder keyed by the run's fingerprint (a finished run reports its
entry; an interrupted one resumes from its last whole checkpoint), the model, training, the evaluation and
the registry entry. A kind fills in the steps (`prepare`, `train`, `measure`, and where it differs `build`
and `entry_parts`) and declares what the plan, the memory estimate and the CLI need to know of it, as class
attributes, so none of them tests kind strings. Kinds are named in `align.stages` (`STAGES`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from align.registry.fingerprint import hash_json, tokenizer_facts
from align.registry.store import Entry
from align.rewards.plugins import plugin_hashes
from align.stages.building import build_policy, check_trainable, lora_targets, stage_tokenizer
from align.stages.context import StageContext
from align.stages.registering import base_lineage, baseline_record, register_entry
from align.stages.resume import resumed_step
from align.stages.run_folder import open_run
from align.stages.tracker import Tracker, stage_tracking

log = logging.getLogger(__name__)

# Config keys that say how a run is watched, not what it trains: left out of the run's fingerprint, so
# adding `--report tensorboard` to an interrupted or finished run resumes it instead of refusing it.
WATCHING_KEYS = ("report", "tracking")


@dataclass
class Prepared:
    """A stage's data, checked and tokenized: training and held-out items, and the report the manifest keeps."""

    train: list
    heldout: list
    report: Any  # align.data.prepare.DataReport
    unit: str = "examples"  # what one item is, for the log: examples, pairs, prompts


@dataclass
class Trained:
    """What training left: the model to measure and register (None on processes other than the main one),
    its logged history, timings and the whole run's mean training loss."""

    model: Any
    history: list[dict]
    timings: dict
    train_loss: float | None = None


@dataclass
class EntryParts:
    """What a kind adds to the entry every stage writes (`register_entry`)."""

    kind: str = "policy"
    artifact: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    files: list = field(default_factory=list)  # callables given the entry folder


class Stage:
    """A stage kind. Subclasses set `kind` and `config_type` and implement `prepare`, `train` and `measure`."""

    kind: ClassVar[str]
    config_type: ClassVar[type]  # the stage's typed config (`align.config.recipe`)
    entry_kind: ClassVar[str] = "policy"  # the registry kind of what it registers
    rows_per_example: ClassVar[int] = 1  # sequences per training item, for the memory estimate (pairs: 2)
    data_kind: ClassVar[str] = "conversations"  # what its data files hold: conversations, pairs, feedback, prompts
    lm_head: ClassVar[bool] = True  # computes LM-head logits (a reward model's score head does not)
    may_set_chat_template: ClassVar[bool] = False  # only SFT may choose a template other than its parent's
    default_parent: ClassVar[bool] = False  # later stages without `from:` start from the latest such stage

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.cfg = ctx.config
        self.tokenizer = None
        self.data: Prepared | None = None
        self.config_dump: dict = {}
        self.fingerprint: dict = {}
        self.resume_from: Path | None = None
        self.model = None
        self.peft_cfg = None

    # ---------------------------------------------------------------- plan time (no weights)

    @classmethod
    def heldout_demonstrations(cls, recipe, cfg, tokenizer) -> list | None:
        """The held-out demonstrations `align report` measures perplexity on when the recipe names no
        `eval.data` (the first stage that has some: SFT's held-out split); None for kinds without."""
        return None

    @classmethod
    def check_processes(cls, cfg, name: str, processes: int) -> None:
        """Raise an error naming the key when the config cannot run under `processes` processes
        (before they are launched); nothing to check by default."""

    @classmethod
    def memory_sequence_length(cls, cfg, longest_row: int | None) -> int:
        """The sequence length that sets the memory peak: the longest row (when the plan read the data) up to
        `max_length`."""
        return min(longest_row, cfg.max_length) if longest_row is not None else cfg.max_length

    @classmethod
    def pass_token_budget(cls, cfg) -> int | None:
        """Padded tokens above which one optimizer step's batch runs as several passes (`max_pass_tokens`)."""
        return getattr(cfg, "max_pass_tokens", None)

    @classmethod
    def keeps_reference_copy(cls, cfg) -> bool:
        """Whether training holds a second, frozen copy of the weights as its reference."""
        return False

    @classmethod
    def generated_at_once(cls, cfg) -> int:
        """Sequences the stage generates at once while training (their KV cache), 0 for none."""
        return 0

    @property
    def tracker(self) -> Tracker:
        """Where the run logs its figures (`StageContext.tracker`): disabled until the run starts training."""
        return self.ctx.tracker

    # ---------------------------------------------------------------- the lifecycle

    def run(self) -> Entry:
        """Train, evaluate and register one entry; a run that finished already returns its entry."""
        finished = self.start()
        if finished is not None:
            return finished
        # metrics.jsonl, and the trackers `report` names (`align.stages.tracker`), for the rest of the run
        with stage_tracking(self.ctx, resumed_step(self.resume_from) if self.resume_from else None):
            if self.resume_from is None:
                self.tracker.log_start(self.config_dump, self.lineage_record(), self.cfg.tracking)
            return self.train_and_register()

    def train_and_register(self) -> Entry:
        """Build, train, measure and register (`run` after its start)."""
        self.model, self.peft_cfg = self.build()
        trainable, total = check_trainable(self.ctx, self.model)
        log.info("%s: %d train / %d held-out %s; %s trainable of %s parameters%s", self.ctx.entry_name,
                 len(self.data.train), len(self.data.heldout), self.data.unit, f"{trainable:,}", f"{total:,}",
                 self.describe())
        trained = self.train()
        metrics = self.measure(trained)
        if trained.train_loss is not None:
            metrics["train_loss"] = trained.train_loss
        return self.register(trained, metrics)

    def start(self) -> Entry | None:
        """Seed, parent, checked tokenizer, data, run folder. Returns the entry of a run that finished already."""
        import torch

        from align.models.loading import materialize

        ctx, cfg = self.ctx, self.cfg
        torch.manual_seed(cfg.seed)
        ctx.parent = materialize(ctx.parent, ctx.registry)
        self.tokenizer = stage_tokenizer(ctx, may_set_template=self.may_set_chat_template)
        self.data = self.prepare(self.tokenizer)
        self.config_dump = cfg.model_dump(by_alias=True)
        trained = {k: v for k, v in self.config_dump.items() if k not in WATCHING_KEYS}
        self.fingerprint = {"config": hash_json(trained), "data": self.data.report.fingerprint,
                            "seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                            "parent": ctx.parent.lineage(), "tokenizer": tokenizer_facts(self.tokenizer)["hash"]}
        plugins = plugin_hashes(self.plugin_specs(), ctx.recipe.resolve_path)
        if plugins:  # only then: fingerprints of runs without user code stay what they were
            self.fingerprint["plugins"] = plugins
        finished, self.resume_from = open_run(ctx, self.fingerprint)
        return finished

    def plugin_specs(self) -> list[str]:
        """The user code this run calls (checkers, reward functions, metrics), whose file contents its
        fingerprint covers."""
        sources = getattr(self.cfg, "rewards", None) or []
        named = [name for s in sources for name in (s.checker, getattr(s, "function", None)) if name]
        return named + list(self.ctx.recipe.eval.checkers) + list(self.ctx.recipe.eval.metrics)

    def prepare(self, tokenizer) -> Prepared:
        """Load, check and tokenize the stage's data; raise on bad data, naming file and row."""
        raise NotImplementedError

    def build(self):
        """(model, LoRA config or None) on the parent's weights: a causal LM by default."""
        return build_policy(self.ctx, self.tokenizer)

    def describe(self) -> str:
        """More for the stage's opening log line (`; loss sigmoid, reference precomputed`)."""
        return ""

    def train(self) -> Trained:
        raise NotImplementedError

    def measure(self, trained: Trained) -> dict:
        """The figures the entry records: the stage's own and the evaluation hook's."""
        raise NotImplementedError

    def entry_parts(self, trained: Trained, metrics: dict) -> EntryParts:
        """What this kind adds to the entry; a policy's LoRA targets by default."""
        return EntryParts(adapter={"targets": lora_targets(self.peft_cfg)})

    def register(self, trained: Trained, metrics: dict) -> Entry:
        parts = self.entry_parts(trained, metrics)
        last_step = trained.timings.get("steps") or max((h.get("step", 0) for h in trained.history), default=0)
        self.tracker.log_evaluation(last_step, metrics)  # the entry's figures, at the step it was trained to
        tracking = self.tracker.record()
        if tracking:  # where this run's curves are: metrics.jsonl, and each tracker's folder or run
            parts.manifest["tracking"] = tracking
        entry = register_entry(
            self.ctx, parts.kind, trained.model, self.tokenizer, self.peft_cfg, report=self.data.report,
            config_dump=self.config_dump, history=trained.history, timings=trained.timings, metrics=metrics,
            artifact_extra=parts.artifact, adapter_extra=parts.adapter, manifest_extra=parts.manifest,
            extra_files=parts.files)
        self.tracker.log_entry(entry.ref, last_step, entry.path)  # its ref and the pictures beside it
        return entry

    def lineage_record(self) -> dict:
        """What the tracker records of the run's entry: its name, parent and base refs, config and data hashes."""
        def ref(lineage: dict) -> str:
            return str(lineage.get("ref") or lineage.get("id") or lineage.get("path"))

        return {"entry": f"{self.ctx.entry_name} (its version is given at registration)",
                "parent": ref(self.ctx.parent.lineage()), "base": ref(base_lineage(self.ctx)),
                "config_hash": hash_json(self.config_dump), "data_hash": self.fingerprint.get("data")}

    def baseline_manifest(self, baseline: dict | None) -> dict:
        return {"baseline": baseline_record(self.ctx, baseline)}


def logged_history(trainer) -> list[dict]:
    """A `Trainer`'s log history without the summary line it appends at the end of training."""
    return [h for h in trainer.state.log_history if h.get("step", 0) > 0 or "loss" in h]
