"""`align export REF --format hf|gguf`: load (merging adapters), write to a staging folder, verify, rename.

Why it is built this way:
- Adapter entries go through `align.export.merge` first (fp32, checked against the unmerged adapter), so an
  export never needs peft or the registry, and the reference every check compares with is the entry as
  the registry defines it: the unmerged adapter's outputs (or the full weights' own, in fp32).
- The output is built in a hidden sibling folder (`.NAME.partial-*`), verified by reloading it the way its
  users will, and only then renamed into place, like registry entries: a failed verification or a crash
  leaves no half-written export, and an existing export is replaced only with `force`.
- `export.json` beside the weights records the source's lineage (ref, base, adapter settings, tokenizer
  and chat-template hashes) and every figure measured (merge and export parity, sizes), so an exported
  file can be traced back to the run that made it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from align.errors import ExportError
from align.export.gguf import check_config_json, gguf_dtype, verify_gguf, write_gguf
from align.export.hf import hf_dtype, verify_hf, write_hf
from align.registry.fingerprint import library_versions, tokenizer_facts
from align.export.merge import merge_entry, task_of
from align.models.loading import (
    ModelSource,
    adapter_parent,
    load_causal_lm,
    load_tokenizer,
    materialize,
    resolve_model_ref,
)
from align.export.parity import model_outputs, sample_inputs
from align.registry.records import write_json_atomic
from align.registry.store import Registry

log = logging.getLogger(__name__)

FORMATS = {"hf": ("fp32", hf_dtype), "gguf": ("f16", gguf_dtype)}  # format -> (default dtype, dtype check)


@dataclass
class Loaded:
    """The model to export (fp32, adapters merged) and the reference outputs it is checked against."""

    source: ModelSource
    model: object
    tokenizer: object
    task: str
    pooling: str
    samples: list
    reference: list
    merge_parity: dict | None


def load_source(source: ModelSource, registry: Registry) -> Loaded:
    entry = source.entry
    task = task_of(entry)
    pooling = (entry.artifact.get("pooling") if entry is not None else None) or "last"
    if entry is not None and entry.artifact.get("type") == "adapter":
        merged = merge_entry(entry, registry, "fp32")
        return Loaded(source, merged.model, merged.tokenizer, task, pooling, merged.samples, merged.reference,
                      merged.parity)
    if task == "classifier":
        from align.rewards.scoring import load_reward_model

        model, tokenizer = load_reward_model(source, registry, dtype="fp32")
    else:
        tokenizer = load_tokenizer(source, registry)
        model = load_causal_lm(source, registry, dtype="fp32")
    model.eval()
    samples = sample_inputs(tokenizer)
    return Loaded(source, model, tokenizer, task, pooling, samples, model_outputs(model, samples, task), None)


def weights_config(source: ModelSource, registry: Registry) -> dict | None:
    """The `config.json` of the full weights `source` stands on (an adapter chain walked down to its base),
    read without loading weights; None for a source not on disk (a hub id, a GGUF file)."""
    import json

    while source.entry is not None and source.entry.artifact.get("type") == "adapter":
        source = materialize(adapter_parent(source.entry, registry), registry)
    if source.entry is not None:
        path = source.entry.file(source.entry.artifact["path"]) / "config.json"
    elif source.kind == "local":
        path = Path(source.path) / "config.json"
    else:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the load names what is wrong with it


def slug(ref: str) -> str:
    """`quickstart/sft@2` -> `quickstart-sft-v2` (a file-name-safe form of a ref)."""
    name, _, version = ref.partition("@")
    text = name.strip("/").replace("/", "-") + (f"-v{version.lstrip('v')}" if version else "")
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def refuse_before_loading(source: ModelSource, registry: Registry, fmt: str) -> None:
    """What `fmt` cannot write, refused from the entry and its `config.json` before any adapter is merged or
    weights load (`write_gguf` checks the model again)."""
    if fmt != "gguf":
        return
    if task_of(source.entry) == "classifier":
        raise ExportError(f"{source.entry.ref} is a reward model; GGUF export writes causal LMs. "
                          "Export it with --format hf")
    config = weights_config(source, registry)
    if config is not None:
        check_config_json(config)


def export_model(ref: str, registry: Registry, fmt: str, dtype: str | None = None, out: str | Path | None = None,
                 force: bool = False, loaded: Loaded | None = None) -> dict:
    """Export `ref` and return the report (also written as `export.json` in the output folder). `loaded`:
    `ref` already loaded by `load_source`, to reuse across several GGUF exports (writing GGUF leaves it
    unchanged; HF export casts the model to its dtype)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")
    default_dtype, check_dtype = FORMATS[fmt]
    dtype = check_dtype(dtype or default_dtype)
    source = materialize(resolve_model_ref(ref, registry), registry)
    entry = source.entry
    refuse_before_loading(source, registry, fmt)
    name = slug(entry.ref if entry is not None else Path(ref).name or ref)
    out = Path(out) if out is not None else Path("exports") / f"{name}-{fmt}-{dtype}"
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it, or --out to write elsewhere")
    if out.exists():
        why = not_an_export(out)
        if why:
            raise ExportError(f"{out}: --force replaces only an earlier export (a folder with align's export.json), "
                              f"and this {why}; remove it yourself or pass --out to write elsewhere")

    loaded = loaded if loaded is not None else load_source(source, registry)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        report = _write_and_verify(loaded, staging, fmt, dtype, name)
        write_json_atomic(staging / "export.json", report)
        report["files"]["export.json"] = (staging / "export.json").stat().st_size
        report["total_bytes"] = sum(report["files"].values())
        _readable(staging)
        _move_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    report["path"] = str(out)
    log.info("exported %s to %s (%s)", ref, out, human_size(report["total_bytes"]))
    return report


def not_an_export(folder: Path) -> str | None:
    """Why `folder` is not one align exported (and so must not be deleted by `--force`), or None. An empty
    folder holds nothing to lose, so it counts as replaceable."""
    import json

    if not folder.is_dir():
        return "is not a folder"
    if not any(folder.iterdir()):
        return None
    try:
        record = json.loads((folder / "export.json").read_text())
    except (OSError, ValueError):
        return "folder has no readable export.json"
    if not (isinstance(record, dict) and {"format", "source", "verification"} <= record.keys()):
        return "folder's export.json was not written by align export"
    return None


def _write_and_verify(loaded: Loaded, staging: Path, fmt: str, dtype: str, name: str) -> dict:
    entry = loaded.source.entry
    stored = None
    if fmt == "hf":
        write_hf(loaded.model, loaded.tokenizer, staging, dtype, loaded.task)
        checks = verify_hf(staging, loaded.tokenizer, loaded.samples, loaded.reference, dtype, loaded.task,
                           loaded.pooling)
    else:
        path = staging / f"{name}-{dtype}.gguf"
        description = f"exported by align from {entry.ref if entry is not None else loaded.source.ref}"
        stored = write_gguf(loaded.model, loaded.tokenizer, path, dtype, name, description)
        checks = verify_gguf(path, loaded.tokenizer, loaded.samples, loaded.reference, dtype)
    files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
    manifest = entry.manifest if entry is not None else {}
    return {
        "format": fmt,
        "dtype": dtype,
        "task": loaded.task,
        **({"reward_pooling": loaded.pooling} if loaded.task == "classifier" else {}),
        "source": {"ref": entry.ref if entry is not None else loaded.source.ref, "lineage": loaded.source.lineage(),
                   "kind": entry.kind if entry is not None else None,
                   "artifact": (entry.artifact.get("type") if entry is not None else None)},
        "base": manifest.get("base"),
        "adapter": manifest.get("adapter"),
        "tokenizer": tokenizer_facts(loaded.tokenizer),
        "reference": "the unmerged adapter (fp32)" if loaded.merge_parity is not None else "the source weights (fp32)",
        "merge": {"parity_vs_adapter": loaded.merge_parity} if loaded.merge_parity is not None else None,
        "verification": checks,
        **({"stored_tensors": stored} if stored is not None else {}),
        "files": files,
        "total_bytes": sum(files.values()),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }


def _readable(folder: Path) -> None:
    """Files get the usual permissions (0644 under umask 022): safetensors are written 0600, which a
    server running as another user (a vLLM container) could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the verified folder to `out`; an existing `out` (only with force) is swapped out, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
