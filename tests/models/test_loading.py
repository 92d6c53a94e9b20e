"""`resolve_model_ref`: what a ref names, or an error that says why, without loading weights."""

from __future__ import annotations

import pytest

from align.errors import RegistryError
from align.models.loading import ModelSource, resolve_model_ref
from align.registry.store import Registry


def make_entry(registry: Registry, name: str = "quickstart/sft"):
    with registry.create(name, "policy") as draft:
        draft.manifest.update({"artifact": {"type": "adapter", "path": "adapter"}})
    return draft.entry


def test_registry_entry(tmp_registry):
    entry = make_entry(tmp_registry)
    for ref in ("quickstart/sft", "quickstart/sft@1", " quickstart/sft@v1 "):
        source = resolve_model_ref(ref, tmp_registry)
        assert source.kind == "registry"
        assert source.entry.ref == entry.ref == "quickstart/sft@1"
        assert source.lineage() == {"source": "registry", "ref": "quickstart/sft@1"}


def test_local_model_folder(tiny_base, tmp_registry):
    source = resolve_model_ref(str(tiny_base), tmp_registry)
    assert source == ModelSource(ref=str(tiny_base), kind="local", path=str(tiny_base))
    assert source.lineage() == {"source": "local", "path": str(tiny_base)}


def test_folder_without_config_json(tmp_path, tmp_registry):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x00")
    with pytest.raises(RegistryError, match="config.json") as info:
        resolve_model_ref(str(folder), tmp_registry)
    assert str(folder) in str(info.value)


def test_missing_gguf_file(tmp_path, tmp_registry):
    path = tmp_path / "model.Q4_1.gguf"
    with pytest.raises(RegistryError, match="GGUF file not found") as info:
        resolve_model_ref(str(path), tmp_registry)
    assert str(path) in str(info.value)


def test_existing_gguf_file(tmp_path, tmp_registry):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    source = resolve_model_ref(str(path), tmp_registry)
    assert (source.kind, source.path) == ("gguf", str(path))


def test_misspelt_registry_name_suggests_the_close_one(tmp_registry, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_entry(tmp_registry)
    with pytest.raises(RegistryError) as info:
        resolve_model_ref("quickstart/sftt", tmp_registry)
    message = str(info.value)
    assert "quickstart/sftt: no such entry" in message
    assert "did you mean quickstart/sft" in message


def test_missing_version_lists_the_versions(tmp_registry):
    make_entry(tmp_registry)
    with pytest.raises(RegistryError, match=r"no version 3 of quickstart/sft \(has 1\)"):
        resolve_model_ref("quickstart/sft@3", tmp_registry)


def test_uncached_hub_id_offline(tmp_registry, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = "align-tests-nobody/no-such-model-5f3a9c"
    with pytest.raises(RegistryError, match="not in the local hub cache and HF_HUB_OFFLINE=1") as info:
        resolve_model_ref(ref, tmp_registry)
    assert ref in str(info.value)


def test_hub_id_without_hub_check(tmp_registry):
    ref = "align-tests-nobody/no-such-model-5f3a9c"
    assert resolve_model_ref(ref, tmp_registry, check_hub=False) == ModelSource(ref=ref, kind="hub")


def test_packaged_name(tmp_registry):
    source = resolve_model_ref("smollm2-135m-instruct", tmp_registry)
    assert source.kind == "packaged" and source.entry is None
    assert not tmp_registry.root.exists()  # nothing pulled


@pytest.mark.parametrize("ref", ["", "   "])
def test_empty_ref(ref, tmp_registry):
    with pytest.raises(RegistryError, match="empty model reference"):
        resolve_model_ref(ref, tmp_registry)


def test_unknown_plain_name(tmp_registry):
    with pytest.raises(RegistryError, match="no-such-model: no such entry"):
        resolve_model_ref("no-such-model", tmp_registry)


def test_contiguous_head_input_gives_the_same_logits_once_hooked():
    """The hook only changes the input's layout: the same last-position logits as before, and registering
    twice adds one hook."""
    import torch

    from align.models.loading import contiguous_head_input
    from align.models.tiny import make_model, make_tokenizer

    model = make_model(make_tokenizer("chatml"), seed=1, layers=2).eval().requires_grad_(False)
    ids = torch.randint(3, 60, (3, 8))
    with torch.no_grad():
        before = model(input_ids=ids, logits_to_keep=1).logits
        contiguous_head_input(model)
        contiguous_head_input(model)
        after = model(input_ids=ids, logits_to_keep=1).logits
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
    assert before.shape[1] == 1 and torch.allclose(before, after, atol=1e-6)


def test_an_adapter_entry_loads_merged_with_every_weight_trainable(tiny_base, tmp_registry):
    """PEFT loads an adapter for inference, freezing the weights beneath it; merged, they are the entry's plain
    weights, trainable like any loaded model's, so full fine-tuning from a LoRA entry trains them. The merge
    itself is exact: the same logits as the unmerged adapter."""
    import torch

    from align.models.loading import load_causal_lm
    from tests.tiny_entries import register_adapter, unmerged

    entry = register_adapter(tmp_registry, tiny_base)
    model = load_causal_lm(ModelSource(ref=entry.ref, kind="registry", entry=entry), tmp_registry, dtype="fp32")
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    assert not frozen, f"frozen after the merge: {frozen[:3]}"
    ids = torch.tensor([[5, 17, 33, 41, 60]])
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, unmerged(entry)(ids).logits, atol=1e-5)
