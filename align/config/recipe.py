"""Recipe schema: one typed config per stage, unknown keys rejected, every error reported at once.

A recipe is YAML: a `name`, a `base` model, optional `defaults` merged into every stage, an ordered
mapping of `stages` and an `eval` section. A stage's kind is its key (`sft:`) unless it says `kind:`,
so a recipe may hold two stages of one kind (`sft_math: {kind: sft, ...}`).

Validation is pure: it reads the YAML and nothing else. Files, model refs and data rows are checked by
`align.pipeline.plan`, which reuses the same `Problem` type so that all problems reach the user in one list.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

from align.errors import ConfigError, Problem, byte_place

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class Strict(BaseModel):
    """Base for every config block: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


class CrossFieldProblems(ValueError):
    """Every conflict between a block's fields, raised together by its `model_validator`: a validator may
    raise only once, and a block checked one conflict at a time costs the user one run per conflict."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__("; ".join(self.messages))


def raise_conflicts(messages: list[str]) -> None:
    """Raise a block's conflicts (if any) as one `CrossFieldProblems`."""
    if messages:
        raise CrossFieldProblems(messages)


# ---------------------------------------------------------------------------------------------- pieces


class LoraSettings(Strict):
    """LoRA shape. Dropout defaults to 0 (PEFT's own default): on a CPU the random masks cost more than the
    adapter's matmuls (docs/results.md), and on the short runs this framework targets it regularises little."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: Union[Literal["all-linear"], list[str]] = "all-linear"


class QuantSettings(Strict):
    """4-bit settings for QLoRA (bitsandbytes NF4 with double quantization by default)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: the stage's autocast dtype, else fp32


class DataSpec(Strict):
    """Where rows come from: a local JSONL/JSON/parquet file or a hub dataset id (`hf:org/name`). A hub dataset
    may need its `config` (subset: `hf:openai/gsm8k` has "main" and "socratic") and can be pinned to a
    `revision` (branch, tag or commit). `columns` ({new: old}) renames a dataset's fields to those of a known
    format, e.g. {prompt: question, completion: answer}; a row without a named field is an error."""

    path: str
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "preference", "prompts"] = "auto"
    split: str = "train"
    limit: int | None = Field(None, gt=0)
    config: str | None = Field(None, min_length=1)
    revision: str | None = Field(None, min_length=1)
    columns: dict[str, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> "DataSpec":
        hub_only = [key for key in ("config", "revision") if getattr(self, key) is not None]
        if hub_only and not self.path.startswith("hf:"):
            raise ValueError(f"{' and '.join(hub_only)} appl{'y' if len(hub_only) > 1 else 'ies'} to hub datasets "
                             f"(path: hf:org/name) only, not to {self.path}")
        empty = [f"{new!r}: {old!r}" for new, old in self.columns.items() if not new.strip() or not old.strip()]
        if empty:
            raise ValueError(f"columns: names must not be empty ({', '.join(empty)}); write columns as {{new: old}}")
        return self


class GenerationSettings(Strict):
    """How responses are decoded (`align.models.generation`). `temperature` 0 is greedy (top_k/top_p unused); above 0
    it samples, with optional `top_k`/`top_p`. `num_beams` > 1 is beam search (beam sampling when temperature
    > 0). `repetition_penalty` is transformers' (CTRL: a seen token's logit is divided by it when positive,
    multiplied when negative; 1 = off). `presence_penalty`/`frequency_penalty` follow OpenAI: each generated
    token's logit drops by presence * [count > 0] + frequency * count, counted over the response only. A
    response ends at EOS, at a `stop` string (kept in the text) or at `max_new_tokens`; EOS is held back
    until `min_new_tokens`. The defaults are plain greedy decoding."""

    max_new_tokens: int = Field(64, gt=0)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.0, ge=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    num_beams: int = Field(1, gt=0)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: list[str] = []

    @model_validator(mode="after")
    def _consistent(self) -> "GenerationSettings":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) is larger than max_new_tokens "
                             f"({self.max_new_tokens})")
        return self


class Gate(Strict):
    min_accuracy: float = Field(0.6, ge=0, le=1)


class RewardSource(Strict):
    """One term of the PPO reward: a reward-model ref or a named checker, with its weight."""

    model: str | None = None
    checker: str | None = None
    weight: float = 1.0
    args: dict[str, Any] = {}

    @model_validator(mode="after")
    def _exactly_one(self) -> "RewardSource":
        if (self.model is None) == (self.checker is None):
            raise ValueError("give exactly one of `model` (a reward-model ref) or `checker` (a checker name)")
        return self


class KLSettings(Strict):
    """The KL penalty against the reference. `penalty: reward` subtracts coef * (log pi - log ref) from each
    token's reward (InstructGPT); `loss` adds coef * the k3 estimate to the loss (GRPO). `adaptive` moves
    the coefficient toward the value that keeps the per-token KL near `target` (Ziegler et al., 2019)."""

    coef: float = Field(0.05, ge=0)
    adaptive: bool = False
    target: float = Field(0.1, gt=0)
    horizon: int = Field(10000, gt=0)
    penalty: Literal["reward", "loss"] = "reward"


# ---------------------------------------------------------------------------------------------- stages


class StageBase(Strict):
    """Fields every stage shares: where it starts, how weights are trained, the optimisation loop."""

    kind: str
    from_: str | None = Field(None, alias="from")
    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraSettings = LoraSettings()
    quant: QuantSettings = QuantSettings()
    seed: int = 0
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # The attention kernel: `auto` keeps transformers' choice (SDPA). On a CPU with short rows `eager` (plain
    # matmuls and softmax) is faster but keeps the T x T attention weights for the backward pass (more
    # memory; docs/results.md has the figures).
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "auto"
    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(512, gt=8)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(50, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    # A chat template for this stage (a .jinja file, or the template text itself) in place of the parent's.
    # Stages after SFT refuse a tokenizer or template that differs from their parent's unless
    # `allow_template_mismatch: true`: a policy trained on one template and tuned on another learns noise.
    chat_template: str | None = None
    allow_template_mismatch: bool = False
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # The whole stage's budget, from its start to its registry entry: training stops early enough for the
    # final evaluation (as long as the parent's baseline took) and the held-out pass to fit (`align.pipeline.budget`).
    time_limit_minutes: float | None = Field(None, gt=0)
    # Freeze the embeddings and the first N transformer blocks: no adapter there and no backward pass
    # through them, which makes a step ~2x cheaper at N = 2/3 of the blocks.
    freeze_layers: int = Field(0, ge=0)


class TrainerPasses(Strict):
    """For the stages trained by a transformers `Trainer` (SFT, reward, DPO): how a batch's forward and
    backward passes run."""

    # Recompute each block's activations in the backward pass instead of keeping them: more compute, a
    # fraction of the memory (docs/results.md). Off by default: with memory to spare, speed is learning
    # quality. Prompts shared
    # by a pair's two sides then run once per row (a checkpointed block keeps no KV cache to share).
    gradient_checkpointing: bool = False
    # A batch over this many padded tokens (rows x width) trains in several forward/backward passes of about
    # this size (whole rows; both rows of a pair together), with the same gradient: faster on a CPU and less
    # memory, as a big pass's fresh activations cost more than the extra passes (docs/results.md). None:
    # one pass.
    max_pass_tokens: int | None = Field(1024, gt=0)


class SFTStage(StageBase, TrainerPasses):
    kind: Literal["sft"] = "sft"
    data: DataSpec
    eval_data: DataSpec | None = None
    eval_split: float = Field(0.1, ge=0, lt=1)
    assistant_only_loss: bool = True
    # Each batch's `batch_size` conversations packed several to a row of at most `max_length` tokens, position
    # ids restarting per conversation so none attends to another (`align.data.packing`); batches then come in
    # seeded random order instead of grouped by length. Same steps and the same loss as unpacked.
    packing: bool = False
    on_bad_rows: Literal["drop", "error"] = "error"
    max_dropped_share: float = Field(0.1, ge=0, le=1)


class PreferenceData(TrainerPasses):
    """Shared by reward and DPO stages: what to do with bad rows and over-long pairs."""

    data: DataSpec
    eval_data: DataSpec | None = None
    eval_split: float = Field(0.1, ge=0, lt=1)
    on_bad_rows: Literal["drop", "error"] = "drop"
    max_dropped_share: float = Field(0.1, ge=0, le=1)
    truncation: Literal["prompt", "drop"] = "prompt"
    max_prompt_length: int | None = Field(None, gt=0)
    margin_field: str | None = None
    group_by_length: bool = True


class RewardStage(StageBase, PreferenceData):
    """`loss`: bradley_terry = -logsigmoid(r_c - r_r - m); hinge = max(0, m - (r_c - r_r)). The margin m is
    `margin`, or per pair the row field named by `margin_field`. `center_coef` penalizes mean((r_c + r_r)^2)."""

    kind: Literal["reward"] = "reward"
    loss: Literal["bradley_terry", "hinge"] = "bradley_terry"
    margin: float = 0.0
    center_coef: float = Field(0.0, ge=0)
    # last: score read at the last token (the usual); mean: mean of the response tokens' final hidden states
    pooling: Literal["last", "mean"] = "last"
    gate: Gate = Gate()


class DPOStage(StageBase, PreferenceData):
    """`loss`: sigmoid (DPO), cdpo (DPO with `label_smoothing` = share of flipped labels), ipo, hinge, and the
    reference-free simpo (`beta`, target margin `simpo_gamma`) and orpo (weight `orpo_lambda`).

    `reference` (reference-based losses): `precomputed` log-probs from one pass before training (no model
    kept; the cheapest), `adapter_disabled` (LoRA/QLoRA: the same weights with the adapter switched off),
    `copy` (a frozen second copy), or `auto` = precomputed."""

    kind: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo", "hinge", "cdpo", "simpo", "orpo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    simpo_gamma: float = Field(0.5, ge=0)
    orpo_lambda: float = Field(0.1, gt=0)
    # Adds rpo_alpha * the chosen responses' per-token NLL (RPO, Pang et al. 2024): keeps DPO from lowering
    # the likelihood of the preferred answers along with the rejected ones (which can cost EOS and format).
    rpo_alpha: float = Field(0.0, ge=0)
    reference: Literal["auto", "adapter_disabled", "copy", "precomputed"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> "DPOStage":
        conflicts = []
        if self.loss == "cdpo" and self.label_smoothing == 0:
            conflicts.append("loss cdpo needs label_smoothing > 0 (the assumed share of flipped labels)")
        if self.label_smoothing and self.loss not in ("cdpo", "simpo"):
            conflicts.append(f"label_smoothing applies to the cdpo and simpo losses, not {self.loss}")
        if self.loss in ("simpo", "orpo") and self.reference not in ("auto",):
            conflicts.append(f"loss {self.loss} is reference-free; remove reference: {self.reference}")
        if self.reference == "adapter_disabled" and self.method == "full":
            conflicts.append("reference adapter_disabled needs method lora or qlora (full fine-tuning has no "
                             "adapter to switch off); use precomputed or copy")
        raise_conflicts(conflicts)
        return self


class PPOStage(StageBase):
    """RL against reward models, checkers, or a weighted mix (`rewards`), our own PPO (`align.rl.ppo`).

    Each step samples `rollout_batch` responses (`samples_per_prompt` per prompt), scores them, and makes
    `ppo_epochs` passes in minibatches of `minibatch` responses (micro-batches of `batch_size`). `estimator`:
    gae (a critic and GAE with `gamma`, `lam`; `value`: head = a value head on the policy trunk, adapter =
    a value head on a second LoRA adapter of the same base), grpo (group-normalized advantages over
    the k samples of a prompt) or rloo (leave-one-out baseline). `missing_eos_penalty` is subtracted from the
    reward of a response cut at `generation.max_new_tokens`. `skip_uniform_groups` (grpo/rloo with the KL in
    the loss): a prompt whose k responses all got the same reward has zero advantage, so its rows skip the
    scoring and training passes (DAPO's dynamic sampling, without resampling). `eval_split` of the prompts (at most
    `eval_limit`) are held out; the stage reports their reward before and after training."""

    kind: Literal["ppo"] = "ppo"
    prompts: DataSpec
    eval_prompts: DataSpec | None = None
    eval_split: float = Field(0.05, ge=0, lt=1)
    eval_limit: int = Field(64, gt=0)
    rewards: list[RewardSource] = Field(..., min_length=1)
    estimator: Literal["gae", "grpo", "rloo"] = "gae"
    value: Literal["head", "adapter"] = "head"
    vf_coef: float = Field(0.1, ge=0)
    kl: KLSettings = KLSettings()
    generation: GenerationSettings = GenerationSettings(temperature=1.0)
    samples_per_prompt: int = Field(1, gt=0)
    rollout_batch: int = Field(16, gt=0)
    ppo_epochs: int = Field(2, gt=0)
    minibatch: int = Field(8, gt=0)
    clip: float = Field(0.2, gt=0)
    value_clip: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    group_scale: bool = True
    skip_uniform_groups: bool = True
    reward_normalize: bool = False
    reward_clip: float | None = Field(None, gt=0)
    missing_eos_penalty: float | None = Field(None, ge=0)
    allow_failed_gate: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "PPOStage":
        conflicts = []
        if self.rollout_batch % self.samples_per_prompt:
            conflicts.append(f"rollout_batch ({self.rollout_batch}) must be a multiple of samples_per_prompt "
                             f"({self.samples_per_prompt})")
        if self.estimator in ("grpo", "rloo") and self.samples_per_prompt < 2:
            conflicts.append(f"estimator {self.estimator} compares the samples of a prompt: set "
                             "samples_per_prompt >= 2")
        if self.value == "adapter" and self.method == "full":
            conflicts.append("value: adapter puts the critic on a second LoRA adapter; it needs method lora or "
                             "qlora (use value: head with full fine-tuning)")
        if self.minibatch > self.rollout_batch:
            conflicts.append(f"minibatch ({self.minibatch}) is larger than rollout_batch ({self.rollout_batch})")
        if self.generation.num_beams > 1:
            conflicts.append(f"generation.num_beams is {self.generation.num_beams}, but PPO needs responses sampled "
                             "from the policy (beam search picks high-likelihood sequences, not samples): use "
                             "num_beams: 1 with temperature > 0")
        raise_conflicts(conflicts)
        return self


STAGE_KINDS: dict[str, type[StageBase]] = {
    "sft": SFTStage,
    "reward": RewardStage,
    "ppo": PPOStage,
    "dpo": DPOStage,
}

AnyStage = Annotated[Union[SFTStage, RewardStage, PPOStage, DPOStage], Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------------- recipe


class Defaults(Strict):
    """Values merged into every stage that does not set them itself."""

    method: Literal["full", "lora", "qlora"] | None = None
    lora: LoraSettings | None = None
    quant: QuantSettings | None = None
    seed: int | None = None
    dtype: Literal["auto", "fp32", "bf16", "fp16"] | None = None
    max_length: int | None = Field(None, gt=8)
    batch_size: int | None = Field(None, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] | None = None
    freeze_layers: int | None = Field(None, ge=0)


class EvalSettings(Strict):
    """The evaluation hook's settings, shared by every stage so their results compare side by side.

    `prompts` rows hold a `prompt` (text or messages) and, for checkers, an `answer`; `data` holds
    demonstrations for loss and perplexity (default: the SFT stage's held-out split). Metrics (registered in
    `align.eval.hook`): loss, perplexity, checkers, samples, reward (scores of the responses by `reward_model`:
    a reward entry ref or a reward stage of this recipe), win_rate (against the responses of `against`: a ref,
    a stage of this recipe or `base`, the default; judged by `reward_model`, ties count half), length,
    repetition (distinct-1/2) and speed (time to first token, time per output token, tokens/s, one prompt at
    a time over `speed_prompts` prompts)."""

    prompts: DataSpec | None = None
    data: DataSpec | None = None
    metrics: list[str] = ["loss", "perplexity", "checkers", "samples"]
    checkers: list[str] = []
    generation: GenerationSettings = GenerationSettings()
    limit: int = Field(100, gt=0)
    samples: int = Field(3, ge=0)
    batch_size: int = Field(16, gt=0)
    reward_model: str | None = None
    against: str | None = None
    speed_prompts: int = Field(3, gt=0)


class Recipe(Strict):
    name: str = Field(..., pattern=NAME_PATTERN)
    # One line saying what the recipe is for (`align recipes` lists it).
    description: str | None = None
    base: str
    registry: str | None = None
    defaults: Defaults = Defaults()
    stages: dict[str, AnyStage]
    eval: EvalSettings = EvalSettings()
    # Where the recipe came from, for resolving relative paths and for messages; not a YAML key.
    source: str | None = Field(None, exclude=True)
    # The folder the recipe's relative paths were written against when it is read from elsewhere (`align
    # eval REF` in another folder uses the one its run started in, from the manifest); not a YAML key.
    workdir: str | None = Field(None, exclude=True)
    # A partial recipe's keys that failed validation, by block (`broken_keys`); empty for a valid recipe.
    _broken: dict = PrivateAttr(default_factory=dict)

    def stage(self, name: str) -> StageBase:
        return self.stages[name]

    def resolve_path(self, path: str) -> Path:
        """Relative data paths are taken from the working directory, else from `workdir`, else from the
        recipe's folder."""
        candidate = Path(path).expanduser()
        if candidate.is_absolute() or candidate.exists():
            return candidate
        for folder in (self.workdir, Path(self.source).parent if self.source else None):
            if folder is not None and (Path(folder) / candidate).exists():
                return Path(folder) / candidate
        return candidate


def broken_keys(recipe, where: str = "") -> set[str]:
    """The keys at `where` ("" the top level, `stages.NAME`, `eval`; `stages` for stages that could not be
    built at all) that failed validation in a partial recipe (`ConfigError.partial`): the plan skips the
    checks that read them rather than judge a default the user did not write. Empty for a valid recipe."""
    return getattr(recipe, "_broken", {}).get(where, set())


def recipe_record(recipe) -> dict:
    """What a manifest keeps of its recipe: the name, the path as given and made absolute, the folder the
    run started in (what relative paths inside the recipe were resolved against) and the eval settings as
    used (`eval_record`), so `align eval REF` works from any folder."""
    return {"name": recipe.name, "source": recipe.source,
            "path": str(Path(recipe.source).resolve()) if recipe.source else None,
            "workdir": recipe.workdir or str(Path.cwd()), "eval": eval_record(recipe)}


def eval_record(recipe) -> dict:
    """The recipe's eval settings as the run used them, local data paths made absolute: stored in each
    manifest so `align eval REF` evaluates the same way from any folder, even once the recipe has moved."""
    settings = recipe.eval.model_dump(by_alias=True)
    for key in ("prompts", "data"):
        spec = getattr(recipe.eval, key)
        if spec is not None and not spec.path.startswith("hf:"):
            path = recipe.resolve_path(spec.path)
            settings[key]["path"] = str(path.resolve()) if path.exists() else spec.path
    return settings


# ---------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None, workdir: str | None = None) -> Recipe:
    """Read a recipe file, apply `key.path=value` overrides, validate; raise one `ConfigError` with all problems.
    `workdir`: the folder its relative paths were written against, when not the working directory."""
    path = Path(path)
    return validate_recipe(read_recipe_file(path), overrides or [], source=str(path), workdir=workdir)


def read_recipe_file(path: Path) -> Any:
    """The recipe file's YAML. Undecodable bytes, syntax errors and a key given twice in one mapping (YAML
    would keep the last value without a word) are refused, each named by its line."""
    if not path.is_file():
        raise ConfigError([Problem(str(path), "recipe file not found")])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line, column = byte_place(data, err.start)
        raise ConfigError([Problem(f"{path}:{line}:{column}", f"not UTF-8 text (byte 0x{data[err.start]:02x}); "
                                                              "save the recipe as UTF-8")]) from None
    try:
        duplicates = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), str(path))
        if duplicates:
            raise ConfigError(duplicates)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([Problem(where, f"not valid YAML ({getattr(err, 'problem', err)})")]) from None


def _duplicate_keys(node, source: str, path: tuple = (), seen: set | None = None) -> list[Problem]:
    """Keys given twice in one YAML mapping, each named by its line and key path."""
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:  # an alias refers to a node already walked
        return []
    seen.add(id(node))
    found: list[Problem] = []
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found += _duplicate_keys(item, source, (*path, index), seen)
    if not isinstance(node, yaml.MappingNode):
        return found
    first: dict[tuple, int] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        line = key_node.start_mark.line + 1
        if key is not None and key != "<<":
            if (key_node.tag, key) in first:
                found.append(Problem(f"{source}:{line}", f"duplicate key `{_format_loc((*path, key))}` (first at "
                                     f"line {first[(key_node.tag, key)]}); YAML would silently keep only the last"))
            else:
                first[(key_node.tag, key)] = line
        found += _duplicate_keys(value_node, source, (*path, key if key is not None else "?"), seen)
    return found


def validate_recipe(raw: Any, overrides: list[str], source: str | None = None,
                    workdir: str | None = None) -> Recipe:
    """The recipe, or one `ConfigError` with every schema and cross-field problem. The error carries the
    recipe as far as it validates (`partial`), so the plan's checks of files, refs and data join the report."""
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError([Problem("", f"a recipe must be a YAML mapping, got {got}")], source)
    problems: list[Problem] = []
    raw = apply_overrides(raw, overrides, problems)
    for key in ("source", "workdir"):  # fields align sets itself; from the YAML they would be overwritten unseen
        if key in raw:
            problems.append(Problem(key, "unknown key (align records where the recipe came from itself)"))
    names = list(raw["stages"]) if isinstance(raw.get("stages"), dict) else []
    inherited: dict[str, set[tuple]] = {}
    raw = _merge_defaults_and_kinds(raw, problems, inherited)
    try:
        recipe = Recipe.model_validate({**raw, "source": source, "workdir": workdir})
    except ValidationError as err:
        errors = err.errors()
        problems += [p for e in errors for p in _problems_from_pydantic(_placed(e, inherited), raw)]
        problems += _cross_field_problems(raw, errors, problems)
        partial = _partial_recipe(raw, names, source, workdir)
        raise ConfigError(list(dict.fromkeys(problems)), source, partial=partial) from None
    if problems:
        recipe._broken = {"stages": set(names) - set(recipe.stages)}
        raise ConfigError(problems, source, partial=recipe)
    return recipe


def _placed(error: dict, inherited: dict[str, set[tuple]]) -> dict:
    """`error` with its path cleaned (`_clean_loc`); an error in a value a stage inherited from `defaults` is
    placed where the user wrote it (`defaults.lora.rr`, reported once), not under every stage."""
    loc = _clean_loc(error["loc"])
    if len(loc) > 2 and loc[0] == "stages":
        for depth in (1, 2):
            if len(loc) >= 2 + depth and tuple(loc[2:2 + depth]) in inherited.get(loc[1], set()):
                return {**error, "loc": ("defaults", *loc[2:])}
    return {**error, "loc": loc}


def _partial_recipe(raw: dict, names: list[str], source: str | None, workdir: str | None) -> Recipe:
    """The recipe as far as it validates, so the plan checks what it can of a recipe with schema errors in
    the same report: each block keeps the keys that validate on their own, the others take their defaults
    and are listed in `broken_keys`; a stage that cannot be built at all (unknown kind, not a mapping) is
    listed under `stages`."""
    top, broken_top = _valid_values(Recipe, raw, keys=("name", "base", "registry", "defaults"))
    top.setdefault("name", raw["name"] if isinstance(raw.get("name"), str) else "recipe")
    top.setdefault("base", None)
    bodies = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
    if not isinstance(raw.get("stages"), dict):
        broken_top.add("stages")
    stages, broken = {}, {}
    for name, body in bodies.items():
        model = STAGE_KINDS.get(body.get("kind")) if isinstance(body, dict) else None
        if model is not None:
            stages[name], broken[f"stages.{name}"] = _valid_block(model, body)
    settings, broken["eval"] = EvalSettings(), set()
    if isinstance(raw.get("eval", {}), dict):
        settings, broken["eval"] = _valid_block(EvalSettings, raw.get("eval", {}))
    else:
        broken_top.add("eval")
    recipe = Recipe.model_construct(**top, stages=stages, eval=settings, source=source, workdir=workdir)
    recipe._broken = {**broken, "": broken_top, "stages": set(names) - set(stages)}
    return recipe


def _valid_block(model: type[BaseModel], body: dict) -> tuple[BaseModel, set[str]]:
    """`model` built from `body` (its valid keys, defaults for the rest) and the keys that did not validate."""
    try:
        return model.model_validate(body), set()
    except ValidationError:
        values, broken = _valid_values(model, body)
        return model.model_construct(**values), broken


def _valid_values(model: type[BaseModel], body: dict, keys=None) -> tuple[dict, set[str]]:
    """The fields of `body` that validate on their own (by field name), and the keys (of `keys`, default all)
    that are missing while required or do not validate."""
    values, broken = {}, set()
    for name, field in model.model_fields.items():
        key = field.alias or name
        if keys is not None and key not in keys:
            continue
        if key not in body:
            if field.is_required():
                broken.add(key)
            continue
        try:
            values[name] = _field_adapter(model, name).validate_python(body[key])
        except ValidationError:
            broken.add(key)
    return values, broken


@functools.lru_cache(maxsize=None)
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter:
    """A validator for one field of `model` alone, with its constraints (built once: each costs milliseconds)."""
    field = model.model_fields[name]
    return TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)


def _cross_field_problems(raw: dict, errors: list[dict], found: list[Problem]) -> list[Problem]:
    """The checks between fields (`model_validator`s) of stages that also have key or type errors.

    Pydantic runs a model's cross-field checks only once all its fields validated, so they would surface
    only after the other errors were fixed. Here, for each such stage (and each nested block with errors),
    the fields that did validate are collected, the rest take their defaults, and the block's cross-field
    checks run on that. A check that reads a field with an error judges its default, so it may mention a
    value the recipe did not set; the fields it names are still in conflict as written."""
    stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
    bad: dict[str, list[tuple]] = {}
    for error in errors:
        loc = _clean_loc(error["loc"])
        if len(loc) >= 3 and loc[0] == "stages" and isinstance(stages.get(loc[1]), dict):
            bad.setdefault(loc[1], []).append(loc[2:])
    seen = {str(p) for p in found}
    extra: list[Problem] = []
    for name, locs in bad.items():
        body = stages[name]
        model = STAGE_KINDS.get(body.get("kind"))
        if model is not None:
            for problem in _after_checks(model, body, ("stages", name), locs):
                if str(problem) not in seen:
                    seen.add(str(problem))
                    extra.append(problem)
    return extra


def _after_checks(model: type[BaseModel], body: dict, where: tuple, bad_locs: list[tuple]) -> list[Problem]:
    """Run `model`'s after-validators on the fields of `body` that validate alone (defaults for the rest),
    recursing into nested mappings that have errors of their own."""
    problems: list[Problem] = []
    bad_keys = {loc[0] for loc in bad_locs if loc}
    values = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key not in body:
            continue
        nested = _model_in(field.annotation)
        if key in bad_keys:
            if nested is not None and isinstance(body[key], dict):
                problems += _after_checks(nested, body[key], (*where, key),
                                          [loc[1:] for loc in bad_locs if loc and loc[0] == key])
            continue
        try:
            values[name] = _field_adapter(model, name).validate_python(body[key])
        except ValidationError:
            continue
    instance = model.model_construct(**values)
    for decorator in model.__pydantic_decorators__.model_validators.values():
        if decorator.info.mode != "after":
            continue
        try:
            decorator.func(instance)
        except (ValueError, AssertionError) as err:
            messages = err.messages if isinstance(err, CrossFieldProblems) else [str(err)]
            problems += [Problem(_format_loc(where), m[:1].lower() + m[1:]) for m in messages]
        except Exception:  # a check that needs a field this block lacks: nothing to say about it
            continue
    return problems


def apply_overrides(raw: dict, overrides: list[str], problems: list[Problem]) -> dict:
    """`stages.sft.lr=1e-4` sets one key; the value is parsed as YAML (so `true`, `[a, b]` work)."""
    raw = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(Problem(f"--set {item}", "expected KEY.PATH=VALUE"))
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                problems.append(Problem(f"--set {key}", f"`{'.'.join(parts[: i + 1])}` is not a mapping"))
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return raw


def _merge_defaults_and_kinds(raw: dict, problems: list[Problem], inherited: dict | None = None) -> dict:
    """Fill each stage's `kind` from its key and its unset fields from `defaults` (only the keys `Defaults`
    accepts: any other is reported there and merged nowhere). `inherited` receives, per stage, the key paths
    whose values came from `defaults`, so their errors are reported there, once."""
    inherited = {} if inherited is None else inherited
    stages = raw.get("stages")
    if isinstance(stages, dict) and not stages:
        problems.append(Problem("stages", "a recipe needs at least one stage"))
    if not isinstance(stages, dict):
        return raw
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        defaults = {}
    merged = {}
    for name, body in stages.items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            merged[name] = body
            continue
        body = dict(body)
        kind = body.get("kind", name)
        if kind not in STAGE_KINDS:
            known = ", ".join(STAGE_KINDS)
            where = f"stages.{name}.kind" if "kind" in body else f"stages.{name}"
            problems.append(Problem(where, f"unknown stage kind {kind!r}; expected one of {known} "
                                           f"(or add `kind:` to a stage with another name)"))
            continue
        body["kind"] = kind
        stage_fields = STAGE_KINDS[kind].model_fields
        came = inherited.setdefault(name, set())
        for key, value in defaults.items():
            if key not in stage_fields or key not in Defaults.model_fields or value is None:
                continue
            if key not in body:
                body[key] = _deep_copy(value)
                came.add((key,))
            elif isinstance(value, dict) and isinstance(body[key], dict):
                came.update((key, sub) for sub in value if sub not in body[key])
                body[key] = {**_deep_copy(value), **body[key]}
        merged[name] = body
    return {**raw, "stages": merged}


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- messages


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _clean_loc(loc: tuple) -> tuple:
    """Drop the tags pydantic adds to a path: the stage kind (`stages.sft.sft.lr` -> `stages.sft.lr`) and
    union members (`...targets.list[str]`)."""
    loc = tuple(loc)
    if len(loc) > 2 and loc[0] == "stages" and loc[2] in STAGE_KINDS:
        loc = loc[:2] + loc[3:]
    return tuple(p for p in loc if not (isinstance(p, str) and re.match(r"^(function-|literal\[|list\[|str$|int$)", p)))


def _fields_at(loc: tuple, raw: dict) -> list[str]:
    """The keys allowed at `loc` (for 'did you mean'), walking the schema along the path."""
    model: Any = Recipe
    for i, part in enumerate(loc):
        if isinstance(part, int):
            continue
        if model is Recipe and part == "stages" and i + 1 < len(loc):
            body = (raw.get("stages") or {}).get(loc[i + 1], {})
            kind = body.get("kind", loc[i + 1]) if isinstance(body, dict) else None
            model = STAGE_KINDS.get(kind)
            if model is None:
                return []
            loc = loc[: i + 2]
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = model.model_fields.get(part)
        if field is None:
            continue
        model = _model_in(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [f.alias or n for n, f in model.model_fields.items() if n not in ("source", "workdir")]
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


_EXPECTED = {
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


def _problems_from_pydantic(error: dict, raw: dict) -> list[Problem]:
    """The problems of one pydantic error (its path already cleaned by `_placed`): one per conflict of a
    block's `CrossFieldProblems`, else one."""
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, CrossFieldProblems):
        where = _format_loc(tuple(error["loc"]))
        return [Problem(where, m[:1].lower() + m[1:]) for m in cause.messages]
    return [_problem_from_pydantic(error, raw)]


def _problem_from_pydantic(error: dict, raw: dict) -> Problem:
    loc = tuple(error["loc"])
    where = _format_loc(loc)
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1], raw)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else (f" (allowed: {', '.join(allowed)})" if allowed else "")
        return Problem(where, f"unknown key{hint}")
    if kind == "missing":
        return Problem(where, "required key is missing")
    if kind == "literal_error":
        return Problem(where, f"expected one of {error['ctx']['expected']}, got {_show(value)}")
    if kind in _EXPECTED:
        return Problem(where, f"{_EXPECTED[kind]}, got {_show(value)}")
    if kind == "string_pattern_mismatch":
        return Problem(where, f"{_show(value)} must be lowercase letters, digits, '.', '_' or '-'")
    message = error["msg"]
    message = re.sub(r"^(Value error|Assertion failed), ", "", message)
    message = message[0].lower() + message[1:] if message else message
    if value is not None and kind not in {"value_error", "assertion_error"} and not isinstance(value, dict):
        message += f", got {_show(value)}"
    return Problem(where, message)


__all__ = [
    "Recipe", "SFTStage", "RewardStage", "PPOStage", "DPOStage", "StageBase", "EvalSettings", "DataSpec",
    "LoraSettings", "QuantSettings", "GenerationSettings", "RewardSource", "STAGE_KINDS", "load_recipe",
    "validate_recipe", "apply_overrides", "broken_keys", "eval_record", "recipe_record", "read_recipe_file",
    "CrossFieldProblems",
]
