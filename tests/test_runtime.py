"""Allocator tuning: off by default, takes on glibc Linux when asked, and leaves results unchanged."""

import subprocess
import sys

import pytest

CHILD = """
import sys, torch
from align.runtime import tune_allocator
took = tune_allocator()
torch.manual_seed(0)
x = torch.randn(512, 1024, requires_grad=True)
for _ in range(3):
    y = (x @ x.t()).tanh().sum()
    y.backward()
print(took, float(y), float(x.grad.sum()))
"""


def _run(env_value: str | None) -> list[str]:
    import os

    env = dict(os.environ)
    env.pop("ALIGN_MALLOC_TUNE", None)
    if env_value is not None:
        env["ALIGN_MALLOC_TUNE"] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning is Linux only")
def test_tuning_takes_and_changes_no_result():
    tuned, plain, default = _run("1"), _run("0"), _run(None)
    assert tuned[0] == "True" and plain[0] == "False" and default[0] == "False"
    assert tuned[1:] == plain[1:]  # the same figures, bit for bit
