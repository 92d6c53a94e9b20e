"""The GPU check's CPU dry run (`benchmarks/gpu_check.py --dry-run`): every section runs on the tiny model and
the JSON holds each one with finite losses, so the script is known to work before a GPU is lent; and a
section that fails, overruns or finds the budget spent is recorded while the others still run."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ["sft_lora", "sft_qlora", "sft_full", "reward", "dpo", "ppo", "sft_lora_1b", "sft_qlora_1b", "dpo_1b"]
NEEDS_4BIT = {"sft_qlora", "sft_qlora_1b", "qlora_merge"}


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(gpu_check, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    started = time.monotonic()
    code = gpu_check.main(["--dry-run", "--out", str(out)])
    seconds = time.monotonic() - started
    report = json.loads((out / "gpu_check.json").read_text())
    return code, report, (out / "gpu_check.md").read_text(), seconds


def test_dry_run_reports_every_section(gpu_check, dry_run):
    code, report, table, seconds = dry_run
    assert report["mode"] == "dry-run"
    assert list(report["sections"]) == [s.name for s in gpu_check.SECTIONS]
    for name, record in report["sections"].items():
        assert record["status"] in ("ok", "skipped"), (name, record.get("error"), record.get("traceback"))
        assert f"| {name} | {record['status']} |" in table
    assert code == 0
    liger = report["sections"]["liger_sft_1b"]
    assert liger["status"] == "skipped" and liger["note"]  # Liger runs on GPUs only
    can_4bit = report["sections"]["env"]["can_run"]["bnb"]
    for name in NEEDS_4BIT:
        assert (report["sections"][name]["status"] == "ok") == can_4bit, name
    assert "no GPU (CPU dry run)" in table
    assert seconds < 120, f"the dry run took {seconds:.0f} s"


def test_dry_run_trains_every_stage_with_finite_losses(dry_run):
    _, report, _, _ = dry_run
    for name in TRAINING:
        record = report["sections"][name]
        if record["status"] == "skipped":
            assert name in NEEDS_4BIT, (name, record["note"])
            continue
        assert list(record["sides"])[0] == "align" and "trl" not in record["sides"]  # no TRL in a dry run
        losses = record["sides"]["align"]["step_losses"]
        assert losses and all(math.isfinite(x) for x in losses), (name, losses)
        assert record["checks"]["losses_finite"] is True
        if name != "ppo":
            assert record["checks"]["loss_falls"] is not None  # two steps: the check ran
            assert record["sides"]["align"]["tokens_per_second"] > 0
    assert report["sections"]["ppo"]["checks"]["figures_finite"] is True
    assert report["sections"]["sft_lora_1b"]["sides"]["align:one_pass"]["steps"] >= 1


def test_dry_run_checks_merge_rollouts_and_decoding(dry_run):
    _, report, table, _ = dry_run
    eos = report["sections"]["rollout_eos"]
    assert all(eos["checks"].values()), eos
    merge = report["sections"]["qlora_merge"]
    if merge["status"] == "ok":
        assert merge["parity"]["passed"] and merge["parity"]["precision"] == "fp32"
        assert merge["checks"]["trained_as_qlora"] and merge["checks"]["merged_in_fp32"]
    decode = report["sections"]["decode_1b"]
    for variant in ("fixed_length", "varied_length"):
        for way in ("generate", "sampler"):
            assert decode[variant][way]["tokens_per_second"] > 0
    assert decode["fixed_length"]["sampler"]["ended_share"] == 0  # no EOS: every row decodes to the end
    assert [t["target"] for t in report["targets"]] == [t[0] for t in __import__("gpu_check").TARGETS]
    assert "| target | measured | threshold | met |" in table


def _check(gpu_check, tmp_path):
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path)])
    c = gpu_check.new_check(args, tmp_path)
    c.console = io.StringIO()
    return c


def test_a_failing_section_is_recorded_and_the_rest_still_run(gpu_check, tmp_path):
    c = _check(gpu_check, tmp_path)

    def boom(check):
        raise RuntimeError("planted failure")

    gpu_check.run_section(c, gpu_check.Section("boom", boom))
    gpu_check.run_section(c, gpu_check.Section("after", lambda check: {"checks": {"fine": True}}))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["boom"]["status"] == "failed"
    assert "planted failure" in report["sections"]["boom"]["error"]
    assert "RuntimeError" in report["sections"]["boom"]["traceback"]
    assert report["sections"]["after"]["status"] == "ok"
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| boom | failed |" in table and "| after | ok |" in table
    assert "boom: failed (RuntimeError: planted failure)" in c.console.getvalue()


def test_an_overrunning_section_is_stopped_and_a_spent_budget_skips(gpu_check, tmp_path, monkeypatch):
    c = _check(gpu_check, tmp_path)
    monkeypatch.setitem(gpu_check.SECTION_CAP, "dry", 0.3)
    gpu_check.run_section(c, gpu_check.Section("slow", lambda check: time.sleep(5) or {}))
    c.budget = 0
    gpu_check.run_section(c, gpu_check.Section("late", lambda check: {}))
    record = c.report["sections"]
    assert record["slow"]["status"] == "failed" and "stopped after" in record["slow"]["error"]
    assert record["slow"]["seconds"] < 3
    assert record["late"]["status"] == "skipped" and "budget" in record["late"]["note"]


def test_missing_needs_skip_with_the_reason(gpu_check, tmp_path):
    c = _check(gpu_check, tmp_path)
    c.facts["liger_problem"] = "liger_kernel cannot be imported"
    gpu_check.run_section(c, gpu_check.Section("needs_liger", lambda check: {}, ("liger",)))
    assert c.report["sections"]["needs_liger"] == {"about": "", "status": "skipped",
                                                   "note": "liger_kernel cannot be imported", "seconds": 0.0}
