"""Adapter entries for the merge and export tests, built in milliseconds instead of by training.

A LoRA adapter with random, non-zero weights (`init_lora_weights=False`; a fresh adapter has B = 0 and
would merge to the base unchanged) on the tiny base folder, registered with the manifest shape the stages
write through `register_entry`: `artifact.applies_to`, adapter settings, tokenizer facts, lineage. A
reward entry also carries a trained-looking score head in the adapter (`modules_to_save`), different from
the random head a fresh sequence classifier gets, so a merge that lost it would show.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.registry.fingerprint import tokenizer_facts
from align.registry.store import Entry, Registry

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANT = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"}


def register_adapter(registry: Registry, base: Path, name: str = "tiny/sft", kind: str = "policy",
                     method: str = "lora", seed: int = 0, on: Entry | None = None) -> Entry:
    """An adapter entry on the tiny base folder, or, with `on`, on another (adapter) entry like PPO and DPO
    entries on their SFT entry (its weights merged first)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    if on is not None:
        model = unmerged(on).merge_and_unload()
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM", init_lora_weights=False)
    elif kind == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="SEQ_CLS",
                            modules_to_save=["score"], init_lora_weights=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    if kind == "reward":
        with torch.no_grad():
            peft_model.base_model.model.score.modules_to_save["default"].weight.normal_(0.0, 0.5)
    lineage = {"source": "local", "path": str(base)}
    parent = {"source": "registry", "ref": on.ref} if on is not None else lineage
    artifact = {"type": "adapter", "path": "adapter", "applies_to": parent}
    if kind == "reward":
        artifact.update({"head": "score", "pooling": "last"})
    with registry.create(name, kind) as draft:
        peft_model.save_pretrained(draft.path / "adapter")
        tokenizer.save_pretrained(draft.path / "tokenizer")
        draft.manifest.update({
            "stage": {"name": name.split("/")[-1], "kind": "reward" if kind == "reward" else "sft"},
            "artifact": artifact,
            "parent": parent,
            "base": lineage,
            "adapter": {"method": method, "r": 8, "alpha": 16.0, "dropout": 0.0, "targets": sorted(TARGETS),
                        "quant": QUANT if method == "qlora" else None},
            "tokenizer": {"path": "tokenizer", **tokenizer_facts(tokenizer)},
            "metrics": {"eval_loss": 1.5},
            **({"gate": {"min_accuracy": 0.6, "accuracy": 0.9, "passed": True}} if kind == "reward" else {}),
        })
    return draft.entry


def unmerged(entry: Entry):
    """The adapter entry as a peft model over its base (fp32), not merged: the reference for parity."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    applies_to = entry.artifact["applies_to"]
    if applies_to["source"] == "registry":  # an adapter on an adapter entry: that one merged first
        registry = Registry(entry.path.parents[len(entry.name.split("/"))])
        inner = unmerged(registry.resolve(applies_to["ref"])).merge_and_unload()
        return PeftModel.from_pretrained(inner, str(entry.file("adapter"))).eval()
    base = applies_to["path"]
    if entry.kind == "reward":
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(entry.file("adapter"))).eval()
