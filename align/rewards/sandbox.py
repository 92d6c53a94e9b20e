"""Where `python_tests` runs a completion's code against a row's tests (the trainer's side).

Each call starts `sandbox_child.py` in a fresh interpreter with an empty environment, in its own session.
That program forks the solution's process into fresh PID, network, IPC and mount namespaces, under an
unused uid, with rlimits, Landlock, a seccomp filter and an audit hook, and runs the tests in its own
process against the solution's objects over a pipe (`sandbox_wire`, `sandbox_rpc`, `sandbox_remote`). The verdict comes back on a pipe only
that tests' process holds, each line carrying a nonce the solution never sees: a completion that writes
anything anywhere and exits scores 0. A layer the machine refuses (no unshare in a container, not root, an
old kernel, no libseccomp) is skipped and left out of `Verdict.isolation`; docs/rewards.md#checkers says what holds
then. `probe()` tells what this machine gives.
"""

from __future__ import annotations

import marshal
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

from align.rewards import sandbox_wire

HERE = os.path.dirname(os.path.abspath(__file__))
# The child's first frame is the bytecode of its modules (`CHILD_MODULES`), compiled once here:
# compiling them in every child cost 45 ms a check (and no .pyc is written under PYTHONDONTWRITEBYTECODE).
# It ends with os._exit: everything it wrote went out through os.write, and finalizing costs 1-2 ms.
BOOT = """\
import marshal, os, sys
def read(n, got=b""):
    while len(got) < n:
        chunk = os.read(0, n - len(got))
        if not chunk:
            raise SystemExit(3)
        got += chunk
    return got
for name, code in marshal.loads(read(int.from_bytes(read(4), "big"))):
    module = sys.modules[name] = type(sys)(name)
    exec(code, module.__dict__)
sys.modules["sandbox_child"].main()
os._exit(0)
"""
# The child's modules, each after the ones it imports (BOOT runs them in this order).
CHILD_MODULES = ("sandbox_wire", "sandbox_rpc", "sandbox_remote", "sandbox_syscalls", "sandbox_landlock",
                 "sandbox_seccomp", "sandbox_guard", "sandbox_fence", "sandbox_child")
# The layers a check may use, where the kernel allows them; the tests take some away to check what the
# others hold alone (a machine without unshare, without root, without Landlock or libseccomp).
LAYERS = frozenset({"namespaces", "uid", "landlock", "seccomp", "hook"})
PROCESSES = 32  # processes and threads the solution may run at once (RLIMIT_NPROC)
DISK_MB = 64  # its folder (a tmpfs where mount namespaces are allowed) and the largest file (RLIMIT_FSIZE)
DEBUG = bool(os.environ.get("ALIGN_SANDBOX_DEBUG"))  # tracebacks of failing loads and test blocks on stderr
STARTUP_S = 3.0  # on top of the tests' time, before the parent gives up on the child and kills it


@dataclass(frozen=True)
class Verdict:
    passed: tuple[bool, ...]  # one per test block; False for any block without a verdict line
    isolation: tuple[str, ...]  # the layers that held: pid, net, ipc, mnt, uid, landlock, seccomp, hook
    complete: bool  # the child reported the end of the run (and cleaned up after the solution)


def run_tests(source: str, blocks: list[str], timeout: float = 5.0, memory_mb: float = 512) -> Verdict:
    """Run `source`, then each test block against its objects; `timeout` seconds per block (the first
    includes loading the solution), `memory_mb` of address space per process."""
    nonce = secrets.token_hex(16)
    uid = fresh_uid() if "uid" in LAYERS else None
    total = timeout * max(len(blocks), 1)
    with tempfile.TemporaryDirectory(prefix="align-check-") as box:
        config = {"source": source, "dir": box, "uid": uid, "timeout": timeout, "total_s": total,
                  "memory_mb": memory_mb, "disk_mb": DISK_MB, "processes": PROCESSES, "layers": sorted(LAYERS),
                  "path": child_path(), "debug": DEBUG}
        payload = child_code() + frame(config) + frame({"nonce": nonce, "blocks": list(blocks)})
        out = run_child(payload, total + STARTUP_S)
        verdict = parse(out, nonce, len(blocks))
        if not verdict.complete and uid is not None:
            kill_uid(uid)  # the child died before its own sweep: nothing of the solution's may outlive the check
    return verdict


def run_child(payload: bytes, limit_s: float) -> bytes:
    """The child's stdout (its verdict lines) once it exits, or what it wrote before `limit_s` ran out."""
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", BOOT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=None if DEBUG else subprocess.DEVNULL, env={}, cwd="/",
                            start_new_session=True)
    try:
        out, _ = proc.communicate(payload, timeout=limit_s)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, _ = proc.communicate()
    finally:
        kill_group(proc.pid)
        proc.wait()
    return out or b""


def parse(out: bytes, nonce: str, count: int) -> Verdict:
    """Verdict lines carrying this run's nonce; anything else on the pipe is ignored."""
    passed, isolation, complete = [False] * count, (), False
    for line in out.decode("ascii", "replace").splitlines():
        fields = line.split()
        if len(fields) != 3 or not secrets.compare_digest(fields[0], nonce):
            continue
        if fields[1] == "end":
            isolation, complete = tuple(x for x in fields[2].split(",") if x != "none"), True
        elif fields[1].isdigit() and int(fields[1]) < count:
            passed[int(fields[1])] = fields[2] == "1"
    return Verdict(tuple(passed), isolation, complete)


def frame(message) -> bytes:
    return sandbox_wire.frame(sandbox_wire.dumps(message))


@lru_cache(maxsize=1)
def child_code() -> bytes:
    """The child's modules as a marshalled, framed list of (name, code), each after those it imports."""
    codes = []
    for name in CHILD_MODULES:
        path = os.path.join(HERE, name + ".py")
        with open(path, encoding="utf-8") as f:
            codes.append((name, compile(f.read(), path, "exec")))
    return sandbox_wire.frame(marshal.dumps(codes))


@lru_cache(maxsize=1)
def child_path() -> list[str]:
    """site-packages for the child (it starts with -S, 15 ms faster, so .pth files are not processed)."""
    paths = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    return sorted(p for p in paths if p and os.path.isdir(p))


def fresh_uid() -> int | None:
    """A uid nobody uses, for one run (root only; None otherwise): its processes and files are its own."""
    span = uid_span()
    if span is None:
        return None
    low, high = span
    return low + secrets.randbelow(high - low)


@lru_cache(maxsize=1)
def uid_span() -> tuple[int, int] | None:
    """Where unused uids are: the upper half of the largest range this (possibly user) namespace maps."""
    if os.geteuid() != 0:
        return None
    try:
        with open("/proc/self/uid_map") as f:
            ranges = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    if not ranges:
        return None
    inside, _, count = max(ranges, key=lambda r: r[2])
    count = min(count, 2**31 - inside)
    if count < 8192:
        return None
    return inside + count // 2, inside + count - 2


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid`, until none is left (at most a second)."""
    give_up = time.monotonic() + 1.0
    while time.monotonic() < give_up:
        found = False
        for entry in os.listdir("/proc"):
            if entry.isdigit() and process_uid(entry) == uid:
                found = True
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(0.005)


def process_uid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@lru_cache(maxsize=1)
def probe() -> tuple[str, ...]:
    """The layers a check gets on this machine (one trivial run, cached)."""
    return run_tests("x = 1", ["assert x == 1"], timeout=10).isolation
