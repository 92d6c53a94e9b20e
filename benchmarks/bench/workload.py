"""What both sides of the benchmark train on: one model, one tokenization of one data sample, one set of
training settings per stage, so the only difference between the columns is the training code.

The real workload is the default model (`smollm2-135m-instruct`) on `../shared/data` when that folder is there
(GSM8K for SFT, Anthropic HH harmless pairs for reward and DPO) and the quickstart's RL prompts for PPO; the
tiny one (`--tiny`, or no real model/data) is a random two-block model on the data the project ships.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
DEFAULT_MODEL = "smollm2-135m-instruct"
STAGES = ("sft", "reward", "dpo", "ppo")
# Steps per stage in `make bench`: enough steps that the first (warm-up, and on the align side the longest
# batch, which length grouping puts first) does not decide the rate, few enough that both sides of all four
# stages finish in about 20 minutes on 2 CPU cores. With 3 reward steps the first was 69% of align's time.
DEFAULT_STEPS = {"sft": 6, "reward": 6, "dpo": 5, "ppo": 3}
# `align bench --precision`: what each choice sets on the align side (dtype, mixed_precision).
PRECISIONS = {"auto": ("auto", "auto"), "fp32": ("fp32", "no"), "bf16": ("bf16", "bf16"),
              "bf16-autocast": ("fp32", "bf16"), "fp16": ("fp16", "fp16"), "fp16-autocast": ("fp32", "fp16")}
HELDOUT = 16  # held-out SFT examples for the loss both sides are measured on after training


@dataclass
class StageWork:
    """One stage's settings, identical on both sides."""

    stage: str
    data: str
    steps: int
    batch_size: int
    max_length: int
    lr: float
    grad_accum: int = 1
    # PPO / GRPO only
    prompts_per_step: int = 0
    samples_per_prompt: int = 0
    max_new_tokens: int = 0


@dataclass
class Workload:
    model: str                 # registry ref, or a local folder (the tiny model)
    registry: str
    tiny: bool
    seed: int = 0
    precision: str = "auto"  # a key of PRECISIONS, for the align side
    # Stage keys set on top of the shared ones (`{"method": "qlora"}`); the TRL side reads the method back
    # from the stage config, so both sides train the same way (benchmarks/gpu_check.py uses this).
    settings: dict = field(default_factory=dict)
    liger: bool = False  # TRL side: `use_liger_kernel` (the caller patches Liger's kernels into both sides)
    # PEFT's default dropout (0) on both sides
    lora: dict = field(default_factory=lambda: {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"})
    stages: dict[str, StageWork] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Workload":
        raw = json.loads(text)
        raw["stages"] = {k: StageWork(**v) for k, v in raw["stages"].items()}
        return cls(**raw)

    def describe(self) -> dict:
        return {"model": self.model, "tiny": self.tiny,
                "lora": f"r={self.lora['r']} alpha={self.lora['alpha']} {self.lora['targets']}",
                "data": {k: v.data for k, v in self.stages.items()}}


def real_data_available() -> bool:
    return (SHARED_DATA / "gsm8k_train.jsonl").is_file() and (SHARED_DATA / "hh_harmless_pairs.jsonl").is_file()


def real_workload(registry: str, steps: dict[str, int]) -> Workload:
    shared = real_data_available()
    sft = str(SHARED_DATA / "gsm8k_train.jsonl") if shared else str(ROOT / "data/quickstart/sft.jsonl")
    pairs = str(SHARED_DATA / "hh_harmless_pairs.jsonl") if shared else str(ROOT / "data/quickstart/prefs.jsonl")
    prompts = str(ROOT / "data/quickstart/rl_prompts.jsonl")
    return Workload(model=DEFAULT_MODEL, registry=registry, tiny=False, stages={
        "sft": StageWork("sft", sft, steps["sft"], batch_size=4, max_length=512, lr=2e-4),
        "reward": StageWork("reward", pairs, steps["reward"], batch_size=8, max_length=384, lr=1e-4),
        "dpo": StageWork("dpo", pairs, steps["dpo"], batch_size=8, max_length=384, lr=5e-5),
        "ppo": StageWork("ppo", prompts, steps["ppo"], batch_size=8, max_length=256, lr=1e-5,
                         prompts_per_step=8, samples_per_prompt=4, max_new_tokens=48),
    })


def tiny_workload(folder: Path, steps: dict[str, int]) -> Workload:
    """A random tiny Llama and its tokenizer written to `folder`, on the data the project ships."""
    from align.models.tiny import save_tiny_model

    model = save_tiny_model(folder / "tiny-model", hidden=64, layers=2)
    registry = folder / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    data = ROOT / "data/quickstart"
    return Workload(model=str(model), registry=str(registry), tiny=True, stages={
        "sft": StageWork("sft", str(data / "sft.jsonl"), steps["sft"], batch_size=4, max_length=128, lr=1e-3),
        "reward": StageWork("reward", str(data / "prefs.jsonl"), steps["reward"], batch_size=4, max_length=128,
                            lr=1e-3),
        "dpo": StageWork("dpo", str(data / "prefs.jsonl"), steps["dpo"], batch_size=4, max_length=128, lr=1e-3),
        "ppo": StageWork("ppo", str(data / "rl_prompts.jsonl"), steps["ppo"], batch_size=4, max_length=96, lr=1e-4,
                         prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8),
    })


def stage_recipe(work: Workload, stage: StageWork, run_root: Path):
    """A validated one-stage recipe for the align side: the stage's own config class, so the stage code
    gets exactly the config a recipe would give it."""
    from align.config.loading import validate_recipe

    common = {"method": "lora", "lora": work.lora, "seed": work.seed, "lr": stage.lr, "batch_size": stage.batch_size,
              "grad_accum": stage.grad_accum, "max_length": stage.max_length, "max_steps": stage.steps,
              "scheduler": "linear", "logging_steps": 1, "save_steps": 10_000,
              "dtype": PRECISIONS[work.precision][0], "mixed_precision": PRECISIONS[work.precision][1],
              **work.settings}
    rows = stage.steps * stage.batch_size * stage.grad_accum
    if stage.stage == "sft":
        body = {**common, "data": {"path": stage.data, "limit": rows + HELDOUT}, "eval_split": HELDOUT / (rows + HELDOUT),
                "on_bad_rows": "drop"}
    elif stage.stage in ("reward", "dpo"):
        body = {**common, "data": {"path": stage.data, "limit": rows + 1}, "eval_split": 1 / (rows + 1)}
    else:
        body = {**common, "prompts": {"path": stage.data, "limit": stage.steps * stage.prompts_per_step + 1},
                "eval_split": 1 / (stage.steps * stage.prompts_per_step + 1),
                "rewards": [{"checker": "math_answer", "weight": 1.0}], "estimator": "grpo",
                "samples_per_prompt": stage.samples_per_prompt,
                "rollout_batch": stage.prompts_per_step * stage.samples_per_prompt,
                "minibatch": stage.prompts_per_step * stage.samples_per_prompt, "ppo_epochs": 1,
                "kl": {"coef": 0.0, "adaptive": False, "penalty": "loss"},
                # TRL trains every row (a group scored alike has zero advantage, but it still runs): so do we here
                "skip_uniform_groups": False,
                "generation": {"max_new_tokens": stage.max_new_tokens, "temperature": 1.0}}
        body.pop("max_length")
        body["max_length"] = stage.max_length
    raw = {"name": f"bench-{stage.stage}", "base": work.model, "registry": work.registry,
           "stages": {stage.stage: body}, "eval": {"metrics": ["loss"]}}
    return validate_recipe(raw, [], source=str(run_root / "bench.yaml"))
