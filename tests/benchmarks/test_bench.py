"""The benchmark harness end to end, and every stage's runner on both sides (align and plain TRL).

`python -m benchmarks.bench --tiny --steps 2 --stage sft` runs each side in its own process and writes the table
and JSON; the other stages' runners are run here in this process (what each worker process runs), which
checks each stage's figures without paying a Python start and a torch import per side. Speed itself is not
asserted (the benchmark prints it)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench import worker
from benchmarks.bench.__main__ import main
from benchmarks.bench.workload import tiny_workload


def test_tiny_bench_writes_and_prints_both_sides_from_their_own_processes(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--tiny", "--steps", "2", "--stage", "sft", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert set(report["stages"]) == {"sft"}
    for side in ("trl", "align"):
        figures = report["stages"]["sft"][side]
        assert "error" not in figures, (side, figures)
        assert figures["steps"] == 2 and figures["seconds_per_step"] > 0 and figures["peak_rss_mb"] > 0
        assert figures["tokens_per_second"] > 0 and figures["loss_mean"] is not None
    assert report["stages"]["sft"]["align"]["heldout_loss"] is not None
    table = (out / "bench.md").read_text()
    assert table in capsys.readouterr().out  # printed as well as written
    assert "| sft | trl |" in table and "| sft | align |" in table
    assert "tiny model" in table and "cores" in table and "threads" in table


@pytest.fixture(scope="module")
def workload_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-workload")
    spec = folder / "workload.json"
    spec.write_text(tiny_workload(folder, {"sft": 2, "reward": 2, "dpo": 2, "ppo": 2}).to_json())
    return spec


@pytest.mark.parametrize("stage", ["reward", "dpo", "ppo"])
def test_each_stage_runner_measures_both_sides(stage, workload_file, tmp_path):
    for side in ("trl", "align"):
        out = tmp_path / f"{stage}-{side}.json"
        assert worker.main([stage, side, str(workload_file), str(out)]) == 0
        figures = json.loads(out.read_text())
        assert figures["steps"] == 2 and figures["seconds_per_step"] > 0 and figures["peak_rss_mb"] > 0, figures
        if stage == "ppo":
            if side == "align":
                assert figures["generation_seconds"] > 0
        else:
            assert figures["tokens_per_second"] > 0 and figures["loss_mean"] is not None
