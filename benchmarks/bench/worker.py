"""One side of one stage in its own process: `python -m benchmarks.bench.worker STAGE SIDE WORKLOAD_JSON OUT_JSON`.
A process of its own per side keeps each side's peak memory its own."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    from benchmarks.bench.workload import Workload

    stage, side, spec, out = argv
    logging.basicConfig(level=logging.WARNING)
    work = Workload.from_json(Path(spec).read_text())
    runner = importlib.import_module(f"benchmarks.bench.{stage}")
    with tempfile.TemporaryDirectory(prefix=f"bench-{stage}-{side}-") as folder:
        result = runner.run(side, work, work.stages[stage], Path(folder))
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
