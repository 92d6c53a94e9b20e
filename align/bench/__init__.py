"""`align bench`: the same work through align's stage code and through plain TRL + PEFT, side by side.

Each (stage, side) runs in its own subprocess (`align.bench.worker`) so peak memory is that side's alone;
the runner (`align.bench.runner`) collects their results into one table (`align.bench.table`).
"""
