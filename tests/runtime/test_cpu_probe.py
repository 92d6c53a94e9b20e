"""The CPU's measured matmul rates (`align.runtime.cpu_probe`): measured once per machine, then read from the cache."""

from __future__ import annotations

import pytest
import torch

from align.runtime import cpu_probe


def test_matmul_probe_measures_once_and_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    first = cpu_probe.matmul_probe(size=64)
    assert set(first) == {"fp32", "bf16", "fp16"} and all(v > 0 for v in first.values())
    assert (tmp_path / "precision-probe.json").is_file()
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("measured again instead of the cache"))
    assert cpu_probe.matmul_probe(size=64) == first


def test_bf16_speedup_is_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    first = cpu_probe.bf16_speedup("test machine", size=64)
    assert first > 0 and "bf16 speedup|test machine" in (tmp_path / "precision-probe.json").read_text()
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("measured again instead of the cache"))
    assert cpu_probe.bf16_speedup("test machine", size=64) == first
