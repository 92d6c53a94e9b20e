"""The `align` command: thin wrappers over the library (plan, run, models)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from align.errors import AlignError


def _recipe(args):
    from align.recipe import load_recipe

    return load_recipe(args.recipe, args.set or [])


def _registry(args, recipe=None):
    from align.registry import Registry

    if args.registry:
        return Registry(args.registry)
    if recipe is not None and recipe.registry:
        return Registry(recipe.registry)
    return Registry()


def cmd_plan(args) -> int:
    from align.plan import make_plan

    recipe = _recipe(args)
    plan = make_plan(recipe, _registry(args, recipe), args.stage)
    print(plan.describe())
    print("plan OK: no weights were loaded")
    return 0


def cmd_run(args) -> int:
    from align.pipeline import run_recipe

    recipe = _recipe(args)
    produced = run_recipe(recipe, _registry(args, recipe), args.stage, force=args.force)
    for name, entry in produced.items():
        metrics = {k: v for k, v in entry.manifest.get("metrics", {}).items() if isinstance(v, (int, float))}
        baseline = (entry.manifest.get("baseline") or {}).get("metrics") or {}
        print(f"{name}: {entry.ref}  ({entry.path})")
        for key, value in metrics.items():
            before = baseline.get(key)
            shown = f"{before:.4g} -> {value:.4g}" if isinstance(before, (int, float)) else f"{value:.4g}"
            print(f"    {key}: {shown}")
    return 0


def cmd_models(args) -> int:
    registry = _registry(args)
    if args.models_cmd == "list":
        entries = registry.list()
        if not entries:
            print(f"registry {registry.root} is empty")
            return 0
        print(f"{'ref':40} {'kind':8} {'artifact':8} {'parent':34} created")
        for e in entries:
            parent = (e.manifest.get("parent") or {})
            parent = parent.get("ref") or parent.get("id") or parent.get("path") or "-"
            print(f"{e.ref:40} {e.kind:8} {e.artifact.get('type', '-'):8} {parent:34} {e.manifest.get('created', '')}")
        return 0
    if args.models_cmd == "show":
        entry = registry.resolve(args.ref)
        manifest = dict(entry.manifest)
        if not args.full and "history" in manifest:
            manifest["history"] = f"{len(manifest['history'])} records (--full shows them)"
        print(json.dumps(manifest, indent=2, default=str))
        return 0
    if args.models_cmd == "pull":
        from align.packaged import pull

        entry = pull(args.name, registry)
        print(f"{entry.ref} ({entry.path})")
        return 0
    raise AssertionError(args.models_cmd)


def cmd_score(args) -> int:
    from align.data.io import read_rows
    from align.models import resolve_model_ref
    from align.rewards.scoring import load_reward_model, score_rows

    registry = _registry(args)
    rows = read_rows(args.data)  # a bad file is reported before any weights load
    model, tokenizer = load_reward_model(resolve_model_ref(args.ref, registry), registry)
    summary, per_row = score_rows(model, tokenizer, rows, args.data, args.batch_size, args.max_length)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in per_row))
        summary["written"] = args.out
    print(json.dumps({"ref": args.ref, "data": args.data, **summary}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="Post-training alignment: SFT, reward models, PPO, DPO.")
    parser.add_argument("--registry", help="registry folder (default: $ALIGN_REGISTRY or ./registry)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_args(p):
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. stages.sft.lr=1e-4")
        p.add_argument("--stage", action="append", help="run only this stage (repeatable)")

    p = sub.add_parser("plan", help="validate a recipe and print its stages without loading weights")
    recipe_args(p)
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("run", help="run a recipe's stages")
    recipe_args(p)
    p.add_argument("--force", action="store_true", help="discard an incompatible unfinished run instead of refusing")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("score", help="score responses or preference pairs with a reward model")
    p.add_argument("ref", help="reward model: registry ref, local folder or hub id")
    p.add_argument("--data", required=True, help="JSONL/JSON/parquet: preference pairs, or messages / prompt+response rows")
    p.add_argument("--out", help="write one JSON line of scores per row here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024, help="longer conversations keep their last tokens")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("models", help="list, show or pull registry entries")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="all entries")
    show = msub.add_parser("show", help="one entry's manifest")
    show.add_argument("ref")
    show.add_argument("--full", action="store_true")
    pull = msub.add_parser("pull", help="register a packaged model (smollm2-135m-instruct)")
    pull.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    p.set_defaults(fn=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except AlignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
