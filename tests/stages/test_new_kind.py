"""A new stage kind is one module: its config class and its `Stage` subclass, registered with
`@register_stage`. Nothing else in align names it, yet the recipe accepts its `kind:` (and refuses its unknown
keys with their YAML path), `align plan` plans it, the pipeline runs the shared lifecycle on it (run folder,
resume, evaluation hook, registry entry with lineage), and a later stage chains from it.

The kind here, continued pretraining on raw text (`text` rows, every token trained), is written as a user
would write a new kind; the test removes it again afterwards."""

from __future__ import annotations

from typing import Literal

import pytest

from align.config.loading import validate_recipe
from align.config.schema import DataSpec, StageBase, TrainerPasses
from align.errors import ConfigError
from align.pipeline.plan import make_plan
from align.pipeline.run import run_recipe
from align.registry.store import Registry
from align.stages import STAGES, register_stage
from tests.conftest import FAST_STAGE, SFT_ROWS, write_jsonl

# ---------------------------------------------------------------- the new kind: all of it


class PretrainStage(StageBase, TrainerPasses):
    """Continued pretraining: the plain LM loss on every token of raw text."""

    kind: Literal["pretrain"] = "pretrain"
    data: DataSpec
    eval_split: float = 0.1
    packing: bool = False  # the SFT trainer's packing, which this kind trains with


def _pretrain_kind():
    from align.data.io import read_rows
    from align.data.prepare import DataReport, heldout_split
    from align.data.tokenize import Encoded
    from align.eval.hook import evaluate_model
    from align.registry.fingerprint import hash_json
    from align.stages.base import Prepared, Stage, Trained, logged_history
    from align.stages.callbacks import safety_callbacks
    from align.stages.hf_training import train_and_time
    from align.stages.sft import build_trainer

    @register_stage
    class Pretrain(Stage):
        kind = "pretrain"
        config_type = PretrainStage
        data_kind = "text"

        def prepare(self, tokenizer) -> Prepared:
            cfg = self.cfg
            rows = read_rows(self.ctx.recipe.resolve_path(cfg.data.path))
            encoded = [tokenizer(r["text"])["input_ids"][: cfg.max_length - 1] + [tokenizer.eos_token_id]
                       for r in rows]
            examples = [Encoded(ids, list(ids)) for ids in encoded]
            train, heldout = heldout_split(len(examples), cfg.eval_split, cfg.seed)
            report = DataReport(source=str(cfg.data.path), fingerprint=hash_json(encoded), rows=len(rows),
                                kept=len(rows))
            return Prepared([examples[i] for i in train], [examples[i] for i in heldout], report, unit="texts")

        def train(self) -> Trained:
            ctx = self.ctx
            callbacks = safety_callbacks(ctx.budget, ctx.tracker)
            trainer = build_trainer(ctx, self.model, self.tokenizer, self.data.train, self.data.heldout, callbacks)
            result, timings = train_and_time(ctx, trainer, self.resume_from, callbacks)
            return Trained(self.model.eval(), logged_history(trainer), timings, result.training_loss)

        def measure(self, trained: Trained) -> dict:
            return evaluate_model(self.ctx.recipe, trained.model, self.tokenizer, self.data.heldout)

    return Pretrain


# ---------------------------------------------------------------- the test


@pytest.fixture
def pretrain_kind():
    kind = _pretrain_kind()
    yield kind
    STAGES.pop("pretrain")


def _raw(folder, base, stage: dict | None = None) -> dict:
    texts = write_jsonl(folder / "texts.jsonl", [{"text": f"{r['prompt']} {r['completion']}"} for r in SFT_ROWS])
    sft = write_jsonl(folder / "sft.jsonl", SFT_ROWS)
    common = {k: v for k, v in FAST_STAGE.items() if k != "eval_split"}
    return {"name": "tiny", "base": str(base), "eval": {"metrics": ["loss"]},
            "stages": {"pretrain": {"data": str(texts), **common, **(stage or {})},
                       "sft": {"from": "pretrain", "data": str(sft), **FAST_STAGE, "max_steps": 2}}}


def test_a_new_kind_in_one_module_is_planned_run_registered_and_chained(pretrain_kind, tmp_path, tiny_base):
    recipe = validate_recipe(_raw(tmp_path, tiny_base), [], source=str(tmp_path / "r.yaml"))
    registry = Registry(tmp_path / "registry")
    plan = make_plan(recipe, registry)
    assert [(s.name, s.kind) for s in plan.stages] == [("pretrain", "pretrain"), ("sft", "sft")]
    entries = run_recipe(recipe, registry, runs_root=tmp_path / "runs")
    pretrained = entries["pretrain"]
    assert pretrained.ref == "tiny/pretrain@1" and pretrained.kind == "policy"
    assert pretrained.manifest["stage"] == {"name": "pretrain", "kind": "pretrain"}
    losses = [h["loss"] for h in pretrained.manifest["history"] if "loss" in h]
    assert losses[-1] < losses[0]  # it trained
    assert "eval_loss" in pretrained.manifest["metrics"]  # the evaluation hook ran on it
    assert entries["sft"].manifest["parent"]["ref"] == "tiny/pretrain@1"  # and a later stage chains from it
    again = run_recipe(recipe, registry, runs_root=tmp_path / "runs")  # the shared run folder: finished
    assert again["pretrain"].ref == "tiny/pretrain@1"


def test_a_new_kinds_config_errors_name_their_yaml_path(pretrain_kind, tmp_path, tiny_base):
    with pytest.raises(ConfigError) as info:
        validate_recipe(_raw(tmp_path, tiny_base, {"eval_splitt": 0.2, "lr": -1}), [], source=str(tmp_path / "r.yaml"))
    where = sorted(p.where for p in info.value.problems)
    assert where == ["stages.pretrain.eval_splitt", "stages.pretrain.lr"]


def test_an_unregistered_kind_is_refused_with_the_known_ones(tmp_path, tiny_base):
    with pytest.raises(ConfigError, match=r"unknown stage kind 'pretrain'; expected one of dpo, kto, ppo, reward, sft"):
        validate_recipe(_raw(tmp_path, tiny_base), [], source=str(tmp_path / "r.yaml"))
