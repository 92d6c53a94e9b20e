"""`python -m benchmarks.bench --tiny --steps 2`: every stage runs on both sides (align and plain TRL), each in its own
process, and the table and JSON hold both sides' figures. Speed itself is not asserted (the benchmark prints
it); this checks the harness works end to end."""

from __future__ import annotations

import json

from benchmarks.bench.__main__ import main


def test_tiny_bench_runs_every_stage_on_both_sides(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--tiny", "--steps", "2", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert set(report["stages"]) == {"sft", "reward", "dpo", "ppo"}
    for stage, sides in report["stages"].items():
        for side in ("trl", "align"):
            figures = sides[side]
            assert "error" not in figures, (stage, side, figures)
            assert figures["steps"] == 2 and figures["seconds_per_step"] > 0
            assert figures["peak_rss_mb"] > 0
            if stage != "ppo":
                assert figures["tokens_per_second"] > 0 and figures["loss_mean"] is not None
    assert report["stages"]["sft"]["align"]["heldout_loss"] is not None
    assert report["stages"]["ppo"]["align"]["generation_seconds"] > 0
    table = (out / "bench.md").read_text()
    assert table in capsys.readouterr().out  # printed as well as written
    for stage in ("sft", "reward", "dpo", "ppo"):
        assert f"| {stage} | trl |" in table and f"| {stage} | align |" in table
    assert "tiny model" in table and "cores" in table and "threads" in table
