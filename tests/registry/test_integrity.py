"""Damaged entry files (`align.registry.integrity`): a missing adapter weights file or `adapter_config.json`, or a
truncated reward model, is named (entry and file) by `align plan`, by `align models list`, and by merge,
export and score before any weights load, with exit status 2 and no traceback; `align models verify`
also catches content changed at the same size, against the hashes recorded at registration."""

from __future__ import annotations

import pytest
import yaml

from align.cli.main import main
from align.registry.store import Registry
from tests.conftest import write_jsonl
from tests.tiny_entries import register_adapter


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "registry")


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _missing_weights(entry):
    (entry.path / "adapter" / "adapter_model.safetensors").unlink()
    return "adapter/adapter_model.safetensors"


def _missing_config(entry):
    (entry.path / "adapter" / "adapter_config.json").unlink()
    return "adapter/adapter_config.json: missing"


def _truncated_reward(entry):
    _truncate(entry.path / "model" / "model.safetensors")
    return "model/model.safetensors: truncated"


def _plan(tmp_path, raw, registry, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["--registry", str(registry.root), "plan", str(path)])
    return code, *capsys.readouterr()


def test_a_whole_entry_has_no_problems_and_its_manifest_records_each_file(registry, tiny_base):
    from align.registry.integrity import entry_problems

    entry = register_adapter(registry, tiny_base)
    assert entry_problems(entry) == [] and entry_problems(entry, full=True) == []
    files = entry.manifest["files"]
    weights = entry.path / "adapter" / "adapter_model.safetensors"
    assert files["adapter/adapter_model.safetensors"]["bytes"] == weights.stat().st_size
    assert len(files["adapter/adapter_model.safetensors"]["hash"]) == 16
    assert "manifest.json" not in files and any(f.startswith("tokenizer/") for f in files)


def test_file_checks_read_headers_only(tmp_path):
    import torch
    from safetensors.torch import save_file

    from align.registry.integrity import file_problem, safetensors_problem

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(64)}, str(path))
    assert safetensors_problem(path) is None
    _truncate(path, 0.9)
    assert "truncated" in safetensors_problem(path)
    archive = tmp_path / "optimizer.pt"
    torch.save({"a": torch.zeros(64)}, archive)
    assert file_problem(archive) is None
    _truncate(archive, 0.9)
    assert "truncated or damaged" in file_problem(archive)
    assert file_problem(tmp_path / "nope.json") == "missing"


@pytest.mark.parametrize("damage, command", [
    (_missing_weights, "merge"), (_missing_weights, "export"),
    (_missing_config, "merge"), (_missing_config, "export"),
    (_truncated_reward, "score"), (_truncated_reward, "export"),
])
def test_a_damaged_entry_is_named_by_plan_list_and_every_command(damage, command, registry, tiny_base, tiny_reward,
                                                                 tiny_raw_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # export writes exports/ here
    reward = damage is _truncated_reward
    entry = tiny_reward(registry) if reward else register_adapter(registry, tiny_base)
    named = damage(entry)

    raw = tiny_raw_recipe(tmp_path)
    if reward:
        raw["eval"]["reward_model"] = entry.ref
    else:
        raw["stages"]["sft"]["from"] = entry.ref
    code, out, err = _plan(tmp_path, raw, registry, capsys)
    assert code == 2 and "plan OK" not in out and "Traceback" not in out + err
    where = "eval.reward_model" if reward else "stages.sft.from"
    assert f"  - {where}: damaged entry {entry.ref}: {named}" in err, err

    assert main(["--registry", str(registry.root), "models", "list"]) == 0
    out, _ = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith(entry.ref))
    assert "DAMAGED" in row and f"damaged: {named}" in out

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "response": "there"}])
    args = {"merge": ["merge", entry.ref], "export": ["export", entry.ref, "--format", "hf"],
            "score": ["score", entry.ref, "--data", str(data)]}[command]
    code = main(["--registry", str(registry.root), *args])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err
    assert f"{entry.ref} ({entry.path}) cannot be used" in err and named in err, err
    assert [e.ref for e in registry.list()] == [entry.ref]  # nothing registered
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())


def test_damage_deeper_in_an_adapter_chain_is_named_with_its_entry(registry, tiny_base, tiny_raw_recipe, tmp_path,
                                                                    capsys):
    inner = register_adapter(registry, tiny_base, "tiny/sft")
    outer = register_adapter(registry, tiny_base, "tiny/dpo", on=inner, seed=1)
    _missing_weights(inner)
    raw = tiny_raw_recipe(tmp_path)
    raw["stages"]["sft"]["from"] = outer.ref
    code, _, err = _plan(tmp_path, raw, registry, capsys)
    assert code == 2 and f"damaged entry {inner.ref}: adapter/adapter_model.safetensors" in err, err


def test_models_verify_catches_content_changed_at_the_same_size(registry, tiny_base, capsys):
    entry = register_adapter(registry, tiny_base)
    assert main(["--registry", str(registry.root), "models", "verify"]) == 0
    assert "sizes, headers and hashes match" in capsys.readouterr()[0]

    weights = entry.path / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of a tensor: same size, header intact
    weights.write_bytes(bytes(data))
    assert main(["--registry", str(registry.root), "models", "list"]) == 0  # the cheap check cannot see it
    assert "DAMAGED" not in capsys.readouterr()[0]
    assert main(["--registry", str(registry.root), "models", "verify", entry.ref]) == 2
    out, _ = capsys.readouterr()
    assert f"{entry.ref}: DAMAGED" in out
    assert "adapter/adapter_model.safetensors: content changed since registration" in out
