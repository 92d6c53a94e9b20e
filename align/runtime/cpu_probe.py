"""Measured matmul rates of this CPU, cached per machine (`$ALIGN_CACHE/precision-probe.json`): what
`align.runtime.precision` decides AVX512-BF16 without AMX by (`bf16_speedup`) and what its warnings quote for
an explicit dtype the device lacks (`matmul_probe`). Measured, not read from flags: oneDNN's AVX512-BF16
kernels run slower than fp32 on some CPUs (docs/results.md)."""

from __future__ import annotations

import time
from pathlib import Path

from align.errors import DiskFullError
from align.registry.records import read_json_record, write_json_atomic


def _probe_file() -> Path:
    from align.models.packaged import cache_dir

    return cache_dir() / "precision-probe.json"


def _cached(key: str, measure):
    """The cached figure under `key`, else `measure()` stored there (an unwritable cache only costs the next
    probe)."""
    path = _probe_file()
    cached = read_json_record(path) or {}
    if key in cached:
        return cached[key]
    cached[key] = value = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cached)
    except (OSError, DiskFullError):
        pass
    return value


def matmul_probe(device=None, size: int = 256) -> dict[str, float]:
    """GFLOP/s of a square matmul in fp32, bf16 and fp16 on this CPU, measured once per machine (a fraction
    of a second) and cached by CPU, features, torch version and thread count. A simulated device is not
    measured (its figures would be this machine's)."""
    import torch

    from align.runtime import precision  # here, not at the top: precision imports this module

    device = device or precision.device_facts("cpu")
    if precision._simulated:
        return {}

    def measure() -> dict[str, float]:
        rates = {}
        for name in ("fp32", "bf16", "fp16"):
            a, b = (torch.randn(size, size).to(precision.torch_dtype(name)) for _ in range(2))
            for _ in range(3):  # warm up (the first calls set up the kernel and its threads)
                a @ b
            best, started = float("inf"), time.perf_counter()
            for rep in range(20):  # the fastest of a few: other work on the machine only slows a run down
                tick = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - tick)
                if rep >= 4 and time.perf_counter() - started > 0.2:
                    break
            rates[name] = round(2 * size ** 3 / best / 1e9, 2)
        return rates

    return _cached(f"{device.name}|{device.features}|torch {torch.__version__}|{torch.get_num_threads()} threads",
                   measure)


def bf16_speedup(machine: str, size: int = 256) -> float:
    """How many times fp32's rate a bf16 matmul runs at on one thread of this CPU; measured once per machine
    (a fraction of a second) and cached. The two dtypes are timed alternately, the best of each kept, so other
    work on the machine slows both alike; one thread, so a busy second core does not decide it."""
    import torch

    from align.runtime.precision import torch_dtype  # here, not at the top: precision imports this module

    def measure() -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            pairs = {name: tuple(torch.randn(size, size).to(torch_dtype(name)) for _ in range(2))
                     for name in ("fp32", "bf16")}
            best = {name: float("inf") for name in pairs}
            started = time.perf_counter()
            for rep in range(40):
                for name, (a, b) in pairs.items():
                    tick = time.perf_counter()
                    a @ b
                    if rep >= 2:  # the first calls set up the kernels
                        best[name] = min(best[name], time.perf_counter() - tick)
                if rep >= 8 and time.perf_counter() - started > 0.3:
                    break
        finally:
            torch.set_num_threads(threads)
        return round(best["fp32"] / best["bf16"], 3)

    return _cached(f"bf16 speedup|{machine}|torch {torch.__version__}|{size}", measure)
