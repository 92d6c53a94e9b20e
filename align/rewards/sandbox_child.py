"""The program behind a `python_tests` check, run by `sandbox.py` in a bare `python -I -S -B` (stdlib only).

It starts as the tests' process (T). T reads its config from stdin, limits itself, unshares PID, network and
IPC namespaces where the kernel lets it, and forks the solution's process (S). S, still running trusted code,
gets a private read-only view of the filesystem with a size-capped tmpfs as its folder and a fresh /proc,
rlimits, an unused uid (when we are root), no_new_privs, Landlock, a seccomp filter and an audit hook; only
then does it run the solution and serve the tests' requests (`sandbox_fence`). T reads the tests and a
nonce from stdin only after the fork, so S never holds them, runs them against S's objects, and writes one
verdict line per test block to a pipe only it holds. Then it kills S and everything S started. A layer the
kernel refuses is skipped and left out of the last line, so the parent knows what held.

This module is T; S's fences are `sandbox_fence` and the modules it names.
"""

from __future__ import annotations

import builtins
import os
import _signal as signal  # not `signal`: it imports enum, 10 ms of a check's startup
import resource
import sys
import time

if __package__:  # imported as part of `align` (by a test, say)
    from align.rewards.sandbox_syscalls import (
        CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER, PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE,
        libc_call, try_prctl,
    )
    from align.rewards.sandbox_fence import solution_process
    from align.rewards import sandbox_remote as remote
    from align.rewards import sandbox_wire as wire
else:  # in the child, where `sandbox.BOOT` loaded the sandbox modules as top-level modules first
    from sandbox_syscalls import (
        CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER, PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE,
        libc_call, try_prctl,
    )
    from sandbox_fence import solution_process
    import sandbox_remote as remote
    import sandbox_wire as wire

DEBUG = False  # tracebacks of failing test blocks on stderr (ALIGN_SANDBOX_DEBUG=1 in the trainer)


def limit_self(cfg: dict) -> None:
    """Memory and CPU for this process and the solution's (inherited), and no core files."""
    def cap(kind: int, value: int) -> None:
        _, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))

    cap(resource.RLIMIT_AS, int(cfg["memory_mb"] * 1024 * 1024))
    cap(resource.RLIMIT_CPU, int(cfg["total_s"]) + 2)
    cap(resource.RLIMIT_CORE, 0)


def enter_namespaces(enabled: bool) -> list[str]:
    """New PID, network and IPC namespaces for what this process forks next (and no network for the tests
    either). Not root: inside a new user namespace, where we are root mapped to our own uid. [] where the
    kernel or the caller refuses them."""
    if not enabled:
        return []
    user = os.geteuid() != 0
    uid, gid = os.getuid(), os.getgid()
    try:
        libc_call("unshare", CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | (CLONE_NEWUSER if user else 0))
    except OSError:
        return []
    if user:
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError:
            return ["pid", "net", "ipc"]  # the namespaces exist, but without a mapping nothing can mount
    return (["user"] if user else []) + ["pid", "net", "ipc"]


def run_tests(client: remote.Client, names: bytes, blocks: list[str], timeout: float, report) -> None:
    """Each block in a fresh namespace holding the solution's names; `report(i, passed)` after each. The
    first block shares its `timeout` with loading the solution (the deadline the client already has)."""
    for i, block in enumerate(blocks):
        if i:
            client.deadline = time.monotonic() + timeout
        report(i, run_block(client, names, block))


def run_block(client: remote.Client, names: bytes, block: str) -> bool:
    """Whether `block` runs to its end with the solution alive, answering in time."""
    if client.broken:
        return False
    expired = []

    def alarm(signum, frame):
        expired.append(True)
        raise wire.TimedOut()

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(client.deadline - time.monotonic(), 0.001))
    try:
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        for name, value in client.value(names)[1].items():  # decoded afresh: no block sees another's edits
            # Never `__builtins__`, `len` or `abs`: the tests' own builtins stay theirs.
            if type(name) is str and not name.startswith("__") and not hasattr(builtins, name):
                namespace[name] = value
        exec(compile(block, "tests.py", "exec"), namespace)
        passed = True
    except BaseException:  # noqa: BLE001 - any failure, timeout or dead solution fails the block
        passed = False
        if DEBUG:
            import traceback
            traceback.print_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return passed and not expired and not client.broken


def descendants(root: int) -> list[int]:
    """Processes below `root` (this process is a child subreaper, so orphans stay below it)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill_solution(pid: int, isolated: bool) -> None:
    """SIGKILL the solution; in a PID namespace that ends all it started, else sweep everything below us."""
    for target in [pid] + ([] if isolated else descendants(os.getpid())):
        try:
            os.kill(target, signal.SIGKILL)
        except OSError:
            pass
    give_up = time.monotonic() + 2.0
    while time.monotonic() < give_up:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            if isolated or not descendants(os.getpid()):
                return
        left = [] if isolated else descendants(os.getpid())
        for target in left:
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.001)


def main() -> None:
    global DEBUG
    cfg = wire.recv(0)
    DEBUG = cfg["debug"]
    sys.path.extend(cfg["path"])
    limit_self(cfg)
    try_prctl(PR_SET_CHILD_SUBREAPER, 1)
    layers = enter_namespaces("namespaces" in cfg["layers"])
    try_prctl(PR_SET_DUMPABLE, 0)  # not ptrace-able or readable through /proc by a same-uid solution (after
    # the uid_map writes above, which a non-dumpable process cannot make)
    to_s, from_s = os.pipe(), os.pipe()
    verdict = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # a test's print() must not reach the verdict
    pid = os.fork()
    if pid == 0:
        solution_process(cfg, layers, to_s[0], from_s[1])
    os.close(to_s[0])
    os.close(from_s[1])
    tests = wire.recv(0)
    os.close(0)
    nonce = tests["nonce"]
    client = remote.Client(to_s[1], from_s[0])
    client.deadline = time.monotonic() + cfg["timeout"]
    report = lambda i, ok: os.write(verdict, f"{nonce} {i} {int(ok)}\n".encode())  # noqa: E731
    names = None
    try:
        _, layers = wire.recv(from_s[0], client.deadline)  # sent by the fence code, before the solution ran
        names = wire.recv_bytes(from_s[0], client.deadline)
        loaded = client.value(names)
        if not (type(loaded) is tuple and len(loaded) == 2 and loaded[0] == "loaded" and type(loaded[1]) is dict):
            names = None
    except (wire.Dead, wire.TimedOut, ValueError):
        names = None
    if names is None:
        for i in range(len(tests["blocks"])):
            report(i, False)
    else:
        run_tests(client, names, tests["blocks"], cfg["timeout"], report)
    kill_solution(pid, "pid" in layers)
    os.write(verdict, f"{nonce} end {','.join(layers) or 'none'}\n".encode())


if __name__ == "__main__":
    main()
