"""Recipe schema: one typed config per stage, unknown keys rejected, every error reported at once.

A recipe is YAML: a `name`, a `base` model, optional `defaults` merged into every stage, an ordered
mapping of `stages` and an `eval` section. A stage's kind is its key (`sft:`) unless it says `kind:`,
so a recipe may hold two stages of one kind (`sft_math: {kind: sft, ...}`).

This module is the schema only. Reading and validating a recipe file (every problem at once) is
`align.config.loading`; turning pydantic's errors into `Problem`s is `align.config.problems`. Files, model
refs and data rows are checked by `align.pipeline.plan`, which reuses the same `Problem` type so that all
problems reach the user in one list.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, PrivateAttr, create_model, model_validator

from align.config.schema import (
    NAME_PATTERN,
    DataSpec,
    GenerationSettings,
    JudgeSettings,
    LoraSettings,
    QuantSettings,
    StageBase,
    Strict,
    ReportSetting,
    TrackingSettings,
)


def stage_config_types() -> dict[str, type[StageBase]]:
    """Each stage kind's config class, as the stage kinds name them (`align.stages`, `Stage.config_type`).

    The kinds are looked up when a recipe is validated, not when this module is imported: a kind registered
    by its own module (its config class beside its `Stage`) is then a recipe's `kind:` like the shipped ones."""
    from align.stages import stage_kinds

    return {kind: stage.config_type for kind, stage in stage_kinds().items()}


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
    report: ReportSetting | None = None
    tracking: TrackingSettings | None = None


class EvalSettings(Strict):
    """The evaluation hook's settings, shared by every stage so their results compare side by side.

    `prompts` rows hold a `prompt` (text or messages) and, for checkers, an `answer`; `data` holds
    demonstrations for loss and perplexity (default: the SFT stage's held-out split). Metrics (registered in
    `align.eval.metrics`; `metrics` and `checkers` may also name user code, `module:function`): loss,
    perplexity, checkers, samples, reward (scores of the responses by the judge: `reward_model`, a reward
    entry ref or a reward stage of this recipe; or `judge`, a causal LM that answers a rubric,
    `align.rewards.judge`), win_rate (against the responses of `against`: a ref, a stage of this recipe or
    `base`, the default; judged by the same judge, ties count half), length,
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
    judge: JudgeSettings | None = None
    against: str | None = None
    speed_prompts: int = Field(3, gt=0)

    @model_validator(mode="after")
    def _one_judge(self) -> "EvalSettings":
        if self.reward_model is not None and self.judge is not None:
            raise ValueError("give one judge: `reward_model` (a reward entry) or `judge` (a causal LM with a "
                             "rubric), not both")
        return self


class Recipe(Strict):
    name: str = Field(..., pattern=NAME_PATTERN)
    # One line saying what the recipe is for (`align recipes` lists it).
    description: str | None = None
    base: str
    registry: str | None = None
    defaults: Defaults = Defaults()
    stages: dict[str, StageBase]  # each its kind's config class (`recipe_model`)
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


def recipe_model() -> type[Recipe]:
    """`Recipe` with `stages` typed as the registered kinds' configs, told apart by `kind`."""
    return _recipe_model(tuple(stage_config_types().values()))


@functools.lru_cache(maxsize=None)
def _recipe_model(types: tuple[type[StageBase], ...]) -> type[Recipe]:
    any_stage = Annotated[Union[types], Field(discriminator="kind")] if len(types) > 1 else types[0]
    return create_model("Recipe", __base__=Recipe, __module__=__name__, stages=(dict[str, any_stage], ...))


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
