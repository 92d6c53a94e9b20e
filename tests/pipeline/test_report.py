"""The cross-stage report and `align eval`: every entry of a recipe in one table on the same prompts and
metrics, win rate against the base (the base against itself is 0.5), PNGs written, results reused only when
their fingerprint matches (a second report loads no registry weights), and the lm-eval bridge's message."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from align.cli.main import main
from align.pipeline.run import run_recipe
from align.config.loading import load_recipe
from align.pipeline.report import build_report, recipe_entries
from tests.conftest import write_jsonl

PAIRS = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}\n#### {a + b}",
          "rejected": f"#### {a + b + 1}"} for a, b in [(1, 2), (3, 4), (5, 6), (2, 2)]]
PNG = b"\x89PNG\r\n\x1a\n"


def _register_policy(registry, name: str, tokenizer_folder: Path, seed: int, history: list[dict]):
    """A stage-like policy entry with full weights (what a DPO stage with method: full registers)."""
    from transformers import AutoTokenizer

    from align.models.tiny import make_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    model = make_model(tokenizer, seed=seed, hidden=128)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    with registry.create(name, "policy") as draft:
        model.save_pretrained(draft.path / "model", safe_serialization=True)
        tokenizer.save_pretrained(draft.path / "tokenizer")
        draft.manifest.update({"artifact": {"type": "full", "path": "model"}, "tokenizer": {"path": "tokenizer"},
                               "metrics": {}, "history": history})
    return draft.entry


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base):
    """A tiny recipe (sft, reward, dpo) whose SFT stage really ran; the reward and DPO entries are registered
    directly (a random judge and a different policy), so the report has three policies and a judge."""
    from align.registry.store import Registry
    from tests.conftest import recipe_dict, register_tiny_reward

    folder = tmp_path_factory.mktemp("report")
    raw = recipe_dict(folder, tiny_base)
    prefs = write_jsonl(folder / "prefs.jsonl", PAIRS)
    raw["stages"]["reward"] = {"from": "sft", "data": str(prefs)}
    raw["stages"]["dpo"] = {"from": "sft", "data": str(prefs)}
    raw["registry"] = str(folder / "registry")
    (folder / "r.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    recipe = load_recipe(folder / "r.yaml")
    registry = Registry(folder / "registry")
    run_recipe(recipe, registry, only=["sft"], runs_root=folder / "runs")
    register_tiny_reward(registry, tiny_base, "tiny/reward")
    _register_policy(registry, "tiny/dpo", tiny_base, seed=3,
                     history=[{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5}, {"step": 2, "eval_loss": 0.6}])
    return recipe, registry, folder


@pytest.fixture(scope="module")
def report(trained):
    recipe, registry, _ = trained
    return build_report(recipe, registry)


def test_the_report_holds_every_entry_on_the_same_prompts_and_metrics(report, trained):
    recipe, registry, _ = trained
    folder = registry.root / "reports" / "tiny"
    assert [r.label for r in report.rows] == ["base", "sft", "dpo"]
    md = (folder / "report.md").read_text()
    data = json.loads((folder / "report.json").read_text())
    for row in report.rows:
        assert f"| {row.label} | `{row.ref}` |" in md
    for header in ("perplexity", "math_answer", "reward", "win rate vs base", "distinct-1", "tokens/s"):
        assert header in md.splitlines()[next(i for i, line in enumerate(md.splitlines()) if line.startswith("| entry"))]
    assert data["judge"] == "tiny/reward@1"
    assert data["settings"]["metrics"] == ["loss", "perplexity", "checkers", "samples", "reward", "win_rate",
                                           "length", "repetition", "speed"]
    assert [r["ref"] for r in data["rows"]] == [str(recipe.base), "tiny/sft@1", "tiny/dpo@1"]
    for row in data["rows"]:
        metrics = row["metrics"]
        assert len(row["reward_scores"]) == 3
        assert metrics["perplexity"] > 1 and 0 <= metrics["math_answer_pass_rate"] <= 1
        assert metrics["tokens_per_s"] > 0 and metrics["time_to_first_token_s"] > 0
        assert 0 <= metrics["win_rate"] <= 1 and metrics["win_rate_against"] == str(recipe.base)
    base, sft, dpo = data["rows"]
    assert base["metrics"]["win_rate"] == 0.5 and base["metrics"]["win_rate_ties"] == 3
    # the SFT entry's perplexity is on its own held-out split, which the report rebuilt: the hook's number
    manifest = registry.resolve("tiny/sft").manifest
    assert sft["metrics"]["eval_loss"] == pytest.approx(manifest["metrics"]["eval_loss"], rel=1e-3)
    assert dpo["metrics"]["win_rate_ties"] < 3


def test_the_report_draws_training_curves_and_reward_distributions(report, trained):
    _, registry, _ = trained
    folder = registry.root / "reports" / "tiny"
    for name in ("training_curves.png", "reward_distribution.png"):
        assert (folder / name).read_bytes()[:8] == PNG
        assert f"]({name})" in (folder / "report.md").read_text()


def test_a_second_report_reuses_the_kept_evaluations(report, trained, monkeypatch):
    """The evaluations were kept in the manifests: only the base (a local folder, not an entry) loads again."""
    import align.models.loading

    recipe, registry, _ = trained
    loaded = []
    real = align.models.loading.load_causal_lm
    monkeypatch.setattr(align.models.loading, "load_causal_lm", lambda source, *a, **k: loaded.append(source.ref) or
                        real(source, *a, **k))
    again = build_report(recipe, registry)
    assert loaded == [str(recipe.base)]
    assert [r.origin for r in again.rows] == ["evaluated", "cached", "cached"]
    for first, second in zip(report.rows[1:], again.rows[1:]):
        assert second.metrics["reward_mean"] == first.metrics["reward_mean"]
        assert second.metrics["win_rate"] == pytest.approx(first.metrics["win_rate"])


def test_the_hooks_own_metrics_are_reused_when_the_fingerprint_matches(trained, monkeypatch, tmp_path):
    """With the recipe's own metrics the SFT row is the SFT stage's hook result (same settings, prompts and
    held-out set), not a new measurement; the DPO entry, whose manifest has no such metrics, is evaluated."""
    recipe, registry, _ = trained
    report = build_report(recipe, registry, metrics=list(recipe.eval.metrics), out=tmp_path / "own")
    sft = next(r for r in report.rows if r.label == "sft")
    manifest = registry.resolve("tiny/sft").manifest["metrics"]
    assert sft.origin == "manifest" and sft.fingerprint == manifest["eval_fingerprint"]
    assert sft.metrics["math_answer_pass_rate"] == manifest["math_answer_pass_rate"]
    assert next(r for r in report.rows if r.label == "dpo").origin == "evaluated"
    assert (tmp_path / "own" / "report.md").is_file()


def test_entries_are_the_base_and_each_policy_stage_that_exists(trained):
    recipe, registry, _ = trained
    assert [(label, s.kind) for label, s in recipe_entries(recipe, registry)] == \
        [("base", "local"), ("sft", "registry"), ("dpo", "registry")]


def test_align_report_command(trained, capsys, tmp_path):
    recipe, registry, folder = trained
    code = main(["--registry", str(registry.root), "report", str(folder / "r.yaml"), "--metrics",
                 "length,repetition", "--max-new-tokens", "4", "--out", str(tmp_path / "cli")])
    out, _ = capsys.readouterr()
    assert code == 0 and "| base |" in out and "| dpo |" in out and "distinct-1" in out
    assert f"wrote {tmp_path / 'cli' / 'report.md'}" in out
    data = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert data["settings"]["generation"]["max_new_tokens"] == 4
    assert all(r["metrics"]["response_tokens_mean"] <= 4 for r in data["rows"])


def test_align_eval_against_another_model(trained, capsys):
    recipe, registry, folder = trained
    code = main(["--registry", str(registry.root), "eval", "tiny/dpo", "--recipe", str(folder / "r.yaml"),
                 "--against", "tiny/dpo", "--against", "tiny/sft", "--metrics", "reward,win_rate,length"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "win rate of tiny/dpo@1 against tiny/dpo@1: 0.500 (0 wins, 3 ties, 0 losses)" in out
    assert "win rate of tiny/dpo@1 against tiny/sft@1: " in out


def test_align_eval_uses_the_recorded_recipe_from_any_folder(tiny_base, tmp_path, monkeypatch, capsys):
    """The manifest records the recipe's absolute path, the folder the run started in and the eval settings
    as used: `align eval REF` from another folder evaluates the same way (before: "no eval settings"), and
    still does once the recipe file is gone."""
    from tests.conftest import recipe_dict

    work, elsewhere, registry = tmp_path / "work", tmp_path / "elsewhere", str(tmp_path / "registry")
    (work / "recipes").mkdir(parents=True)
    elsewhere.mkdir()
    raw = recipe_dict(work, tiny_base, stage={"max_steps": 2, "save_steps": 2})
    raw["stages"]["sft"]["data"], raw["eval"]["prompts"] = "sft.jsonl", "eval_prompts.jsonl"  # as users write them
    (work / "recipes" / "r.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(work)
    assert main(["--registry", registry, "run", "recipes/r.yaml"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(elsewhere)
    code = main(["--registry", registry, "eval", "tiny/sft", "--json", str(elsewhere / "o.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Loading weights" not in err  # transformers' bar per model loaded: not align's line
    metrics = json.loads((elsewhere / "o.json").read_text())["rows"][0]["metrics"]
    assert {"eval_loss", "math_answer_pass_rate"} <= metrics.keys(), metrics  # the SFT split and the prompts
    (work / "recipes" / "r.yaml").unlink()
    code = main(["--registry", registry, "eval", "tiny/sft", "--metrics", "checkers"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "math_answer" in out


def test_align_eval_refuses_win_rate_without_a_judge(tiny_base, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    code = main(["--registry", str(tmp_path / "reg"), "eval", str(tiny_base), "--prompts", str(prompts),
                 "--against", str(tiny_base)])
    _, err = capsys.readouterr()
    assert code == 2 and "win rate needs a judge" in err


def test_align_eval_with_only_a_prompts_file(tiny_base, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "What is 3 + 4?"}])
    code = main(["--registry", str(tmp_path / "reg"), "eval", str(tiny_base), "--prompts", str(prompts),
                 "--metrics", "length,repetition,speed", "--max-new-tokens", "3", "--json", str(tmp_path / "o.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads((tmp_path / "o.json").read_text())["rows"][0]["metrics"]
    assert metrics["response_tokens_mean"] <= 3 and metrics["speed_prompts"] == 2 and "tokens/s" in out


def test_lm_eval_missing_says_how_to_install(tiny_base, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # absent, whether or not this machine has it
    code = main(["--registry", str(tmp_path / "reg"), "eval", str(tiny_base), "--lm-eval", "hellaswag"])
    _, err = capsys.readouterr()
    assert code == 2 and "pip install lm-eval" in err


def test_lm_eval_bridge_hands_the_loaded_model_to_the_harness(tiny_base, tmp_path, capsys, monkeypatch):
    """With a stand-in harness: the model align loaded goes in as an HFLM, the tasks and limit pass through."""
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["model"], calls["tokenizer"] = pretrained, tokenizer

    def simple_evaluate(model, tasks, limit, num_fewshot):
        calls.update(lm=model, tasks=tasks, limit=limit)
        return {"results": {"arc_easy": {"acc,none": 0.25}}}

    harness = types.ModuleType("lm_eval")
    harness.__spec__ = types.SimpleNamespace(name="lm_eval")
    harness.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", harness)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    monkeypatch.setattr("align.eval.lm_eval_bridge.available", lambda: True)
    code = main(["--registry", str(tmp_path / "reg"), "eval", str(tiny_base), "--lm-eval", "arc_easy", "--limit", "5"])
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out)["lm_eval"] == {"arc_easy": {"acc,none": 0.25}}
    assert calls["tasks"] == ["arc_easy"] and calls["limit"] == 5
    assert type(calls["model"]).__name__ == "LlamaForCausalLM" and isinstance(calls["lm"], HFLM)


def test_a_reward_entry_is_not_evaluated_or_chatted_with(trained, capsys):
    _, registry, _ = trained
    for command in (["eval", "tiny/reward", "--prompts", "x.jsonl"], ["chat", "tiny/reward"]):
        assert main(["--registry", str(registry.root), *command]) == 2
        assert "tiny/reward is a reward model" in capsys.readouterr().err


def test_align_eval_prints_the_samples_metric_without_json():
    """`align eval --metrics samples` has no table column: the prompts and responses are printed below it."""
    from types import SimpleNamespace

    from align.models.loading import ModelSource
    from align.pipeline.comparison import Row
    from align.pipeline.eval_entry import format_eval

    rows = [Row(label="m", source=ModelSource(ref="tiny/sft@1", kind="hub"),
                metrics={"samples": [{"prompt": "What is 3 + 4?", "response": "3 + 4 = 7"}]})]
    text = format_eval(rows, SimpleNamespace(checkers=[]))
    assert "**Prompt:** What is 3 + 4?" in text and "- m: 3 + 4 = 7" in text


def test_the_table_has_a_column_only_for_metrics_some_row_has():
    """`align.pipeline.tables`: perplexity for both rows, reward for one (a dash for the other), no speed column."""
    from align.models.loading import ModelSource
    from align.pipeline.comparison import Row
    from align.pipeline.tables import markdown_table

    rows = [Row(label="base", source=ModelSource(ref="tiny/base@1", kind="hub"), metrics={"perplexity": 12.3456}),
            Row(label="sft", source=ModelSource(ref="tiny/sft@1", kind="hub"),
                metrics={"perplexity": 3.0, "reward_mean": 0.25})]
    assert markdown_table(rows, []).splitlines() == [
        "| entry | ref | perplexity | reward |", "|---|---|---:|---:|",
        "| base | `tiny/base@1` | 12.346 | – |", "| sft | `tiny/sft@1` | 3.000 | 0.250 |"]
