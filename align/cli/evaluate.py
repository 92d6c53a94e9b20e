"""`align score`, `align eval` and `align report`: a model's scores and metrics, alone or side by side."""

from __future__ import annotations

import json

from align.cli.common import generation_flags, generation_overrides, metric_list, recipe_of, registry_of


def cmd_score(args) -> int:
    from align.data.io import read_rows
    from align.models.loading import resolve_model_ref
    from align.rewards.scoring import load_reward_model, score_rows

    registry = registry_of(args)
    rows = read_rows(args.data)  # a bad file is reported before any weights load
    model, tokenizer = load_reward_model(resolve_model_ref(args.ref, registry), registry)
    summary, per_row = score_rows(model, tokenizer, rows, args.data, args.batch_size, args.max_length)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in per_row))
        summary["written"] = args.out
    print(json.dumps({"ref": args.ref, "data": args.data, **summary}, indent=2))
    return 0


def cmd_eval(args) -> int:
    from align.models.loading import materialize, resolve_model_ref

    registry = registry_of(args)
    if args.lm_eval:
        from align.eval import lm_eval_bridge

        lm_eval_bridge.require()  # before any weights load
        source = materialize(resolve_model_ref(args.ref, registry), registry)
        results = lm_eval_bridge.run_lm_eval(source, registry, metric_list(args.lm_eval), limit=args.limit,
                                             num_fewshot=args.num_fewshot)
        print(json.dumps({"ref": args.ref, "lm_eval": results}, indent=2, default=str))
        return 0
    from align.pipeline.eval_entry import format_eval, rows_json, run_eval

    rows, settings = run_eval(args.ref, registry, against=args.against or [], recipe_path=args.recipe,
                              overrides=args.set or [], prompts=args.prompts, metrics=metric_list(args.metrics),
                              limit=args.limit, generation=generation_overrides(args), reward_model=args.reward_model)
    print(format_eval(rows, settings))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(rows_json(rows, settings))
    return 0


def cmd_report(args) -> int:
    from align.pipeline.report import build_report
    from align.pipeline.tables import markdown_table

    recipe = recipe_of(args)
    registry = registry_of(args, recipe)
    report = build_report(recipe, registry, metrics=metric_list(args.metrics), limit=args.limit,
                          generation=generation_overrides(args), reward_model=args.reward_model, out=args.out)
    print(markdown_table(report.rows, list(report.settings.checkers)))
    print()
    for path in report.files:
        print(f"wrote {path}")
    return 0


def add_score(sub) -> None:
    """`align score`'s arguments."""
    p = sub.add_parser("score", help="score responses or preference pairs with a reward model")
    p.add_argument("ref", help="reward model: registry ref, local folder or hub id")
    p.add_argument("--data", required=True, help="JSONL/JSON/parquet: preference pairs, or messages / prompt+response rows")
    p.add_argument("--out", help="write one JSON line of scores per row here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024, help="longer conversations keep their last tokens")
    p.set_defaults(fn=cmd_score)


def add_eval(sub) -> None:
    """`align eval`'s arguments."""
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


def add_report(sub) -> None:
    """`align report`'s arguments."""
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
