"""The recipe schema's building blocks: the strict base model, shared settings (LoRA, quantization, data
specs, generation, reward sources, KL) and the fields every stage config shares (`StageBase`).

Every class is `Strict`: an unknown key is an error naming it, never silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_serializer, model_validator

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


# How a generative judge reads its verdict (`align.rewards.judge`): yes_no = log P(Yes) - log P(No) of the first
# answer token; scale = the expected rating over the digit tokens.
JudgeScore = Literal["yes_no", "scale"]


def _rubric_not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError('the rubric is empty; say what a good response is, e.g. "Is the response helpful, '
                         'correct and concise?"')
    return value


Rubric = Annotated[str, AfterValidator(_rubric_not_blank)]


class RewardSource(Strict):
    """One term of the PPO reward, with its weight: a reward-model ref (`model`), a checker (`checker`: a
    built-in name, or user code as `package.module:function` / `file.py:function`), a batch reward
    function of user code (`function`, `align.rewards.mix.function_term`), or a causal LM that judges each
    response against a `rubric` (`judge`, read as `judge_score`: `align.rewards.judge`); `args` go to the
    checker or function as keyword arguments (a judge takes `batch_size`)."""

    model: str | None = None
    checker: str | None = None
    function: str | None = None
    judge: str | None = None
    rubric: Rubric | None = None
    judge_score: JudgeScore = "yes_no"
    weight: float = 1.0
    args: dict[str, Any] = {}

    @model_validator(mode="after")
    def _exactly_one(self) -> "RewardSource":
        given = [key for key in ("model", "checker", "function", "judge") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `model` (a reward-model ref), `checker` (a checker name or "
                             "`module:function`), `function` (a batch reward function, `module:function`) or "
                             "`judge` (a causal LM ref, with a `rubric`)"
                             + (f"; got {' and '.join(given)}" if given else ""))
        conflicts = []
        if self.judge is not None and self.rubric is None:
            conflicts.append("a `judge` needs a `rubric`: the question it answers about each response, e.g. "
                             '"Is the response helpful, correct and concise?"')
        misplaced = [key for key, unset in (("rubric", None), ("judge_score", "yes_no"))
                     if self.judge is None and getattr(self, key) != unset]
        if misplaced:
            conflicts.append(f"{' and '.join(misplaced)} appl{'y' if len(misplaced) > 1 else 'ies'} to `judge` "
                             "sources only")
        raise_conflicts(conflicts)
        return self

    @model_serializer(mode="wrap")
    def _dump_without_unset_function(self, handler):
        """`function` and the judge's keys are left out of the dump while unset: a stage config written before
        they existed hashes the same, so its run folder still resumes."""
        dump = handler(self)
        for key, unset in (("function", None), ("judge", None), ("rubric", None), ("judge_score", "yes_no")):
            if getattr(self, key) == unset:
                dump.pop(key, None)
        return dump


class JudgeSettings(Strict):
    """A causal LM as the evaluation's judge (`eval.judge`): the same keys as a `judge` reward source."""

    judge: str = Field(..., min_length=1)
    rubric: Rubric
    judge_score: JudgeScore = "yes_no"


class KLSettings(Strict):
    """The KL penalty against the reference. `penalty: reward` subtracts coef * (log pi - log ref) from each
    token's reward (InstructGPT); `loss` adds coef * the k3 estimate to the loss (GRPO). `adaptive` moves
    the coefficient toward the value that keeps the per-token KL near `target` (Ziegler et al., 2019)."""

    coef: float = Field(0.05, ge=0)
    adaptive: bool = False
    target: float = Field(0.1, gt=0)
    horizon: int = Field(10000, gt=0)
    penalty: Literal["reward", "loss"] = "reward"


# The trackers a stage may `report` to: `tensorboard`, `wandb` and `mlflow` are built; `trackio` is named so
# that `align plan` can say it is not supported yet by this version (`align.stages.tracker`), rather than
# "unknown value".
TrackerName = Literal["tensorboard", "wandb", "mlflow", "trackio"]
TRACKER_NAMES = get_args(TrackerName)


def _one_report_problem(value: Any) -> Any:
    """One clear error for a bad `report` (a union of its forms would give one error per form)."""
    names = [value] if isinstance(value, str) else value
    if value == "none" or (isinstance(names, list) and names and all(n in TRACKER_NAMES for n in names)):
        return value
    raise ValueError(f"expected none, a tracker or a list of trackers ({', '.join(TRACKER_NAMES)}), got "
                     f"{value!r}" + ("; write `none` alone, not in a list" if isinstance(value, list)
                                     and "none" in value else ""))


# `none`, one tracker, or a list of them (`tensorboard` or `[tensorboard, wandb]`).
ReportSetting = Annotated[Union[Literal["none"], TrackerName, list[TrackerName]], BeforeValidator(_one_report_problem)]


class TrackingSettings(Strict):
    """How a stage's tracker runs are named and where they are written (`report`). `project`: the W&B project
    and MLflow experiment (default: the recipe's name); `run_name` (default `<recipe>/<stage>`); `tags`; `dir`:
    where local files go instead of the run folder (TensorBoard: `<dir>/<run_name>`; W&B: `<dir>/wandb/`;
    MLflow's default store: `<dir>/mlruns`). `tracking_uri` (MLflow; default `$MLFLOW_TRACKING_URI`, else a
    file store `mlruns/` in the run folder or `dir`), `offline` (W&B: true logs offline, false online; unset:
    `$WANDB_MODE`, else online when W&B credentials are found and offline when not) and `entity` (W&B)."""

    project: str | None = Field(None, min_length=1)
    run_name: str | None = Field(None, min_length=1)
    tags: list[str] = []
    dir: str | None = Field(None, min_length=1)
    tracking_uri: str | None = Field(None, min_length=1)
    offline: bool | None = None
    entity: str | None = Field(None, min_length=1)

    @model_serializer(mode="wrap")
    def _dump_without_unset_added_keys(self, handler):
        """The keys added with W&B and MLflow are left out of the dump while unset: a stage config written
        before they existed hashes the same."""
        dump = handler(self)
        for key in ("tracking_uri", "offline", "entity"):
            if getattr(self, key) is None:
                dump.pop(key, None)
        return dump


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
    # final evaluation (as long as the parent's baseline took) and the held-out pass to fit (`align.stages.budget`).
    time_limit_minutes: float | None = Field(None, gt=0)
    # Freeze the embeddings and the first N transformer blocks: no adapter there and no backward pass
    # through them, which makes a step ~2x cheaper at N = 2/3 of the blocks.
    freeze_layers: int = Field(0, ge=0)
    # Trackers the stage logs to besides `metrics.jsonl` (always written): none by default, so a run creates
    # no other files and imports no tracker unless asked; `tensorboard` is one word away (`align.stages.tracker`).
    report: ReportSetting = "none"
    tracking: TrackingSettings = TrackingSettings()

    def model_dump(self, **kwargs) -> dict:
        """`report` and `tracking` are left out of the dump while at their defaults: a stage config written
        before they existed hashes the same, so its run folder still resumes. Done here rather than in a
        `model_serializer` (as `RewardSource` does): a kind's config with a serializer of its own (PPO's)
        would replace an inherited one, while every kind inherits this."""
        dump = super().model_dump(**kwargs)
        if self.report == "none":
            dump.pop("report", None)
        if self.tracking == TrackingSettings():
            dump.pop("tracking", None)
        return dump


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
