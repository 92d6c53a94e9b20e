"""`python -m benchmarks.bench` (`make bench`): align's stages against plain TRL + PEFT on the same work.

It lives outside the installed package: it is a measuring tool for align's developers, run from a checkout,
and it imports stage internals that the package does not promise to keep.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive whole number")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench",
                                description="the same work through align and through plain TRL + PEFT, side by side")
    p.add_argument("--stage", action="append", help="sft, reward, dpo or ppo (repeatable; default all four)")
    p.add_argument("--steps", type=_positive, help="optimizer steps per stage on each side (default: per stage)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model on the shipped data (fast; for tests)")
    p.add_argument("--out", default="bench", help="folder for bench.md and bench.json (default ./bench)")
    p.add_argument("--registry", help="registry with the default model (default: $ALIGN_REGISTRY or ./registry)")
    p.add_argument("--precision", help="align side's precision, or several to sweep side by side: "
                   "auto,fp32,bf16,bf16-autocast,fp16,fp16-autocast (default auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    from align.cli.main import quiet_libraries
    from benchmarks.bench.runner import run_bench
    from benchmarks.bench.workload import PRECISIONS, STAGES

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_libraries(False)
    stages = args.stage or list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: unknown stage {', '.join(unknown)} (stages: {', '.join(STAGES)})", file=sys.stderr)
        return 2
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()] if args.precision else None
    bad = [p for p in precisions or [] if p not in PRECISIONS]
    if bad:
        print(f"error: --precision {bad[0]}: choose from {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    report = run_bench(stages, steps=args.steps, tiny=args.tiny, out=args.out, registry=args.registry,
                       precisions=precisions)
    failed = [f"{stage}/{side}" for stage, sides in report["stages"].items() for side, r in sides.items() if "error" in r]
    if failed:
        print(f"error: {', '.join(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
