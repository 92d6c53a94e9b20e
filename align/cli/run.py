"""`align recipes`, `align plan` and `align run`: from a recipe to planned stages to registered entries."""

from __future__ import annotations

import argparse
import sys

from align.cli.common import recipe_of, registry_of


def cmd_recipes(args) -> int:
    from pathlib import Path

    from align.config.catalog import RECIPES_DIR, format_table, shipped_recipes

    folder = Path(args.folder) if args.folder else RECIPES_DIR
    if not folder.is_dir():
        print(f"error: {folder}: no such folder", file=sys.stderr)
        return 2
    recipes = shipped_recipes(folder)
    if not recipes:
        print(f"no recipes in {folder}")
        return 0
    print(format_table(recipes, root=Path.cwd()))  # paths as `align run` takes them from here
    return 0


def cmd_plan(args) -> int:
    from align.pipeline.plan import make_plan

    recipe = recipe_of(args, with_plan=True)
    plan = make_plan(recipe, registry_of(args, recipe), args.stage)
    print(plan.describe())
    print("plan OK: no weights were loaded")
    return 0


def cmd_run(args) -> int:
    from align.runtime import distributed
    from align.pipeline import launch
    from align.pipeline.run import run_recipe

    args.set = report_overrides(args)
    recipe = recipe_of(args, with_plan=True)
    if (args.nproc > 1 or args.engine) and not distributed.is_distributed():
        from align.pipeline.plan import make_plan

        plan = make_plan(recipe, registry_of(args, recipe), args.stage)  # every recipe problem now, not in N processes
        from align.stages import stage_class

        for stage in plan.stages:  # batches that split among the processes must split evenly: said now
            stage_class(stage.kind).check_processes(recipe.stages[stage.name], stage.name, args.nproc)
        machines = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in launch.MACHINE_FLAGS}
        return launch.relaunch(args.argv, args.nproc, args.engine or "ddp", machines)
    launch.check_running_engine()
    registry = registry_of(args, recipe)
    if distributed.is_main():
        registry.clean_staging()  # entries half-written by a run that crashed while registering
    produced = run_recipe(recipe, registry, args.stage, force=args.force, continue_run=args.continue_run)
    if not distributed.is_main():
        return 0
    for name, entry in produced.items():
        metrics = {k: v for k, v in entry.manifest.get("metrics", {}).items() if isinstance(v, (int, float))}
        baseline = (entry.manifest.get("baseline") or {}).get("metrics") or {}
        print(f"{name}: {entry.ref}  ({entry.path})")
        for key, value in metrics.items():
            before = baseline.get(key)
            shown = f"{before:.4g} -> {value:.4g}" if isinstance(before, (int, float)) else f"{value:.4g}"
            print(f"    {key}: {shown}")
    return 0


def report_overrides(args) -> list[str]:
    """`--set` with `--report X` added as every stage's `report: X` (after the other overrides, so it wins
    over the recipe and over `--set`): the same path every override takes, so it is validated and planned
    like a key written in the recipe."""
    overrides = list(args.set or [])
    if args.report is None:
        return overrides
    from pathlib import Path

    from align.config.loading import read_recipe_file

    raw = read_recipe_file(Path(args.recipe))
    names = list(raw["stages"]) if isinstance(raw, dict) and isinstance(raw.get("stages"), dict) else []
    trackers = [name.strip() for name in args.report.split(",") if name.strip()]
    value = trackers[0] if len(trackers) == 1 else "[" + ", ".join(trackers) + "]"
    return overrides + [f"stages.{name}.report={value}" for name in names]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def add_recipes(sub) -> None:
    """`align recipes`'s arguments."""
    p = sub.add_parser("recipes", help="list the shipped recipes with what each is for")
    p.add_argument("folder", nargs="?", help="list the recipes in this folder instead")
    p.set_defaults(fn=cmd_recipes)


def _recipe_args(p) -> None:
    """The arguments `plan` and `run` share: the recipe, overrides, the stages to take."""
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. stages.sft.lr=1e-4")
    p.add_argument("--stage", action="append", help="run only this stage (repeatable)")


def add_plan(sub) -> None:
    """`align plan`'s arguments."""
    p = sub.add_parser("plan", help="validate a recipe and print its stages without loading weights")
    _recipe_args(p)
    p.set_defaults(fn=cmd_plan)


def add_run(sub) -> None:
    """`align run`'s arguments."""
    p = sub.add_parser("run", help="run a recipe's stages")
    _recipe_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="discard an incompatible unfinished run instead of refusing, "
                      "and train a finished stage again instead of reporting its entry")
    mode.add_argument("--continue", dest="continue_run", action="store_true", help="train a finished stage on for "
                      "more steps (with a higher max_steps or epochs) from its last checkpoint, optimizer state "
                      "and schedule position kept; registers a new version that records the entry it continues")
    p.add_argument("--report", metavar="TRACKERS", help="log every stage to these trackers, overriding the recipe's "
                   "`report`: tensorboard, wandb, mlflow, or none (comma-separated for several); metrics.jsonl is always "
                   "written")
    scale = p.add_argument_group("several processes (re-runs this command under `accelerate launch`)")
    scale.add_argument("--nproc", type=_positive, default=1, help="processes in all (all machines together)")
    scale.add_argument("--engine", help="ddp (default with --nproc), fsdp, zero2, zero3 (DeepSpeed), or an accelerate "
                       "config file")
    scale.add_argument("--num-machines", type=_positive, help="machines taking part (default 1)")
    scale.add_argument("--machine-rank", type=int, help="this machine's rank, 0 on the main machine")
    scale.add_argument("--main-process-ip", help="address of the machine with rank 0")
    scale.add_argument("--main-process-port", type=int, help="a free port on the main machine")
    p.set_defaults(fn=cmd_run)
