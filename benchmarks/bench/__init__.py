"""`python -m benchmarks.bench`: the same work through align's stage code and through plain TRL + PEFT, side by side.

Each (stage, side) runs in its own subprocess (`benchmarks.bench.worker`) so peak memory is that side's alone;
the runner (`benchmarks.bench.runner`) collects their results into one table (`benchmarks.bench.table`).
"""
