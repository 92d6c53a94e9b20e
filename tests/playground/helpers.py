"""Tiny registry entries for the playground's tests: two policies (different seeds, so their answers differ)
and a reward model, registered as stages would register them."""

from __future__ import annotations

from pathlib import Path

from align.models.tiny import make_model, make_tokenizer
from align.registry.store import Registry
from tests.conftest import register_tiny_reward


def register_tiny_policy(registry: Registry, name: str, seed: int, parent: str = "tiny-base") -> object:
    tokenizer = make_tokenizer("chatml")
    model = make_model(tokenizer, seed=seed)
    with registry.create(name, "policy") as draft:
        model.save_pretrained(draft.path / "model", safe_serialization=True)
        tokenizer.save_pretrained(draft.path / "tokenizer")
        draft.manifest.update({"artifact": {"type": "full", "path": "model"}, "tokenizer": {"path": "tokenizer"},
                               "stage": {"name": "sft", "kind": "sft"}, "parent": {"source": "local", "path": parent},
                               "metrics": {"math_answer_pass_rate": 0.25 * seed, "eval_loss": 3.5}})
    return draft.entry


def playground_registry(root: Path, tiny_base: Path) -> Registry:
    registry = Registry(root)
    register_tiny_policy(registry, "tiny/a", seed=1)
    register_tiny_policy(registry, "tiny/b", seed=2)
    register_tiny_reward(registry, tiny_base, "tiny/reward")
    return registry
