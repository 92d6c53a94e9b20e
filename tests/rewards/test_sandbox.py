"""The `python_tests` sandbox, attacked class by class (issue 32). Each attack runs under several sets of
layers: all of them, and sets that stand for machines where some are missing (no unshare, no root, an old
kernel without Landlock or libseccomp) or that leave one layer out to show what the others hold alone.
An attack is skipped only under a set where none of the layers that stop it held, and the skip names
them. Every test asserts the attack failed and left nothing behind: files outside unchanged, no process
alive afterwards, no packet received, score 0 for a forged verdict, secrets unread."""

from __future__ import annotations

import ctypes
import glob
import os
import secrets
import socket
import subprocess
import time

import psutil
import pytest

from align.rewards import sandbox
from align.rewards.checkers import get_checker

ALL = sandbox.LAYERS
LAYER_SETS = {
    "all": ALL,
    "no-unshare": ALL - {"namespaces"},  # root in a container that refuses unshare
    "unprivileged": ALL - {"namespaces", "uid"},  # not root, no unshare, a kernel with Landlock
    "hook-only": frozenset({"hook"}),  # not root, no unshare, no Landlock, no libseccomp
    "os-only": ALL - {"hook"},  # what the kernel holds without the audit hook
    "ns-uid-only": frozenset({"namespaces", "uid"}),  # namespaces and a uid of its own, nothing else
    "rlimits-only": frozenset(),  # rlimits, a fresh session and the sweep after the check
}
_EFFECTIVE: dict[frozenset, tuple[str, ...]] = {}


@pytest.fixture(params=list(LAYER_SETS), ids=list(LAYER_SETS))
def layers(request, monkeypatch) -> tuple[str, ...]:
    """Restrict the sandbox to one set; the layers that held under it on this machine."""
    monkeypatch.setattr(sandbox, "LAYERS", frozenset(LAYER_SETS[request.param]))
    if sandbox.LAYERS not in _EFFECTIVE:
        _EFFECTIVE[sandbox.LAYERS] = sandbox.run_tests("x = 1", ["assert x == 1"]).isolation
    return _EFFECTIVE[sandbox.LAYERS]


def needs(held: tuple[str, ...], *stoppers: str) -> None:
    """Skip unless one of the layers that stop this attack held (run under a set where none did, the
    attack would get through: that is the gap the README states)."""
    if not set(stoppers) & set(held):
        pytest.skip(f"none of {', '.join(stoppers)} held here (held: {', '.join(held) or 'nothing'})")


@pytest.fixture(autouse=True)
def no_survivors(monkeypatch):
    """Make this test process a child subreaper, so anything the check leaves running becomes our child,
    and pin the run's uid; afterwards nothing of the check's may be alive, by either count."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    uid = sandbox.fresh_uid()
    monkeypatch.setattr(sandbox, "fresh_uid", lambda: uid)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    boxes = set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "align-check-*")))
    yield
    try:
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert left == [], f"processes outlived the check: {left}"
        if uid is not None:
            assert [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid] == []
        assert set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "align-check-*"))) <= boxes
    finally:
        libc.prctl(36, 0, 0, 0, 0)


@pytest.fixture
def outside(tmp_path):
    """A folder outside the sandbox with a file in it; yields a function that says whether anything changed."""
    (tmp_path / "kept.txt").write_text("original")
    os.chmod(tmp_path / "kept.txt", 0o644)
    before = snapshot(tmp_path)
    yield tmp_path, lambda: snapshot(tmp_path) == before


def snapshot(folder) -> dict:
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            content = open(path, "rb").read() if os.path.isfile(path) and not os.path.islink(path) else None
            found[os.path.relpath(path, folder)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, content)
    return found


@pytest.fixture
def listeners():
    """A UDP socket, a TCP listener and an abstract unix socket on this machine; yields their addresses
    and a function returning what reached any of them."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"\0align-sandbox-test-{secrets.token_hex(4)}"
    unix.bind(name)
    for s in (udp, tcp, unix):
        s.setblocking(False)

    def received() -> list:
        got = []
        for s in (udp, unix):
            try:
                got.append(s.recv(100))
            except BlockingIOError:
                pass
        try:
            got.append(tcp.accept())
        except BlockingIOError:
            pass
        return got

    yield {"udp": udp.getsockname()[1], "tcp": tcp.getsockname()[1], "unix": name}, received
    for s in (udp, tcp, unix):
        s.close()


@pytest.fixture
def helper():
    """A process of the trainer's user holding a secret in its environment, in a session of its own."""
    token = secrets.token_hex(16)
    proc = subprocess.Popen(["sleep", "60"], env={"ALIGN_TEST_SECRET": token}, start_new_session=True)
    yield proc, token
    proc.kill()
    proc.wait()


def check(source: str, tests: str = "assert True", timeout: float = 5.0) -> sandbox.Verdict:
    return sandbox.run_tests(source, [tests], timeout=timeout)


# A helper every attack below uses: run each attempt, keep the names of those that did not raise.
ATTEMPT = """
import os
done = []
def attempt(name, fn):
    try:
        fn()
        done.append(name)
    except OSError:
        pass
def escaped():
    return done
"""


# ------------------------------------------------------------------------------------------ 1. forged verdict

FORGERIES = [
    # issue 32's hack: find the old checker's done marker in the runner file, write it, exit before the tests
    "import os, re\n"
    "for name in os.listdir('.'):\n"
    "    try:\n"
    "        text = open(name).read()\n"
    "    except OSError:\n"
    "        continue\n"
    "    for marker in re.findall(r'done-[0-9a-f]{16}', text):\n"
    "        open(marker, 'w').write('ok')\n"
    "def add_one(x):\n    return x + 2\n"
    "os._exit(0)\n",
    # verdict-looking lines on every descriptor, files with likely names, then an exit before the tests
    "import os, sys\n"
    "for fd in range(256):\n"
    "    for line in (b'ok\\n', b'1\\n', b'0 0 1\\n', b'0 end pid\\n'):\n"
    "        try:\n"
    "            os.write(fd, line)\n"
    "        except OSError:\n"
    "            pass\n"
    "for name in ('done', 'done-0', 'verdict', 'ok'):\n"
    "    try:\n"
    "        open(name, 'w').write('ok')\n"
    "    except OSError:\n"
    "        pass\n"
    "print('ok', flush=True)\n"
    "def add_one(x):\n    return x + 2\n"
    "os._exit(0)\n",
    "import sys\ndef add_one(x):\n    return x + 2\nsys.exit(0)",
    "import os\ndef add_one(x):\n    os._exit(0)",  # exits while the tests run
    "import os, signal\ndef add_one(x):\n    os.kill(os.getpid(), signal.SIGKILL)",
    "import threading, os\ndef add_one(x):\n    threading.Timer(0.01, os._exit, (0,)).start()\n    return x + 2",
    # the always-equal object, and an int that says it equals anything
    "class Yes:\n    __eq__ = lambda self, other: True\n    __ne__ = lambda self, other: False\n"
    "    __bool__ = lambda self: True\n    __hash__ = lambda self: 0\n"
    "def add_one(x):\n    return Yes()",
    "class Int(int):\n    __eq__ = lambda self, other: True\ndef add_one(x):\n    return Int(x + 5)",
    # patching what the tests would use: assert, builtins, the comparison
    "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
    "builtins.len = lambda x: 2\ndef add_one(x):\n    return x + 2",
    "import sys\nsys.settrace(lambda *a: None)\ndef add_one(x):\n    return x + 2",
    # speaking the protocol itself: its own "loaded" message, giving the tests `__builtins__`, `len`, `abs`
    "import os, sys\n"
    "rpc = sys.modules['sandbox_rpc']\n"
    "ends = {}\n"
    "for fd in os.listdir('/proc/self/fd'):\n"
    "    try:\n"
    "        flags = int(open(f'/proc/self/fdinfo/{fd}').read().split('flags:')[1].split()[0], 8)\n"
    "        if int(fd) > 2:\n"
    "            ends['w' if flags & 1 else 'r'] = int(fd)\n"
    "    except OSError:\n"
    "        pass\n"
    "server = rpc.Server(ends['r'], ends['w'])\n"
    "def add_one(x):\n    return x + 2\n"
    "def zero(*args):\n    return 0\n"
    "names = {'__builtins__': {'abs': zero, 'len': zero}, 'add_one': add_one, 'abs': zero, 'len': zero}\n"
    "rpc.send_raw(ends['w'], rpc.frame(rpc.dumps(('loaded', names), server.ref)))\n"
    "server.serve()\n",
]


@pytest.mark.parametrize("forgery", range(len(FORGERIES)))
def test_a_forged_verdict_scores_zero(layers, forgery):
    """The verdict comes from the tests' process, on a pipe the solution never holds, with a nonce it never
    sees: no marker, exit code, descriptor write, patched builtin or message of the solution's own can pass
    a failing test (here `add_one(1) == 2` with a wrong add_one)."""
    row = {"tests": "assert len([1]) == 1\nassert add_one(1) == 2\nassert abs(add_one(1) - 2) < 1e-9"}
    assert get_checker("python_tests")(FORGERIES[forgery], row) == 0.0
    assert get_checker("python_tests")("def add_one(x):\n    return x + 1", row) == 1.0  # the same check passes


def test_the_solution_never_sees_the_tests(layers):
    """The tests (and their expected values) reach only the tests' process, after the fork: nothing the
    solution can read holds them, so it cannot copy an expected value."""
    needle = secrets.token_hex(8)
    seek = ATTEMPT + f"""
def readable():
    yield from range(64)
    for pid in os.listdir('/proc'):
        if pid.isdigit() and int(pid) != os.getpid():
            yield f'/proc/{{pid}}/cmdline'
            yield f'/proc/{{pid}}/environ'
            try:
                yield from (f'/proc/{{pid}}/fd/{{fd}}' for fd in os.listdir(f'/proc/{{pid}}/fd'))
            except OSError:
                pass

def seen():
    needle = {needle[::-1]!r}[::-1].encode()
    hits = []
    for where in readable():
        try:
            fd = where if isinstance(where, int) else os.open(where, os.O_RDONLY | os.O_NONBLOCK)
            os.set_blocking(fd, False)
            if needle in os.read(fd, 1 << 20):
                hits.append(where)
        except OSError:
            pass
    return hits
"""
    verdict = check(seek, f"# {needle}\nassert seen() == []")
    assert verdict.passed == (True,)


# ------------------------------------------------------------------------------------------ 2. filesystem

def test_dir_fd_writes_outside_fail(layers, outside):
    """`os.open`/`remove`/`rename`/`mkdir`/`symlink` relative to a descriptor of a folder outside: the hook
    cannot see the folder behind `dir_fd=` of an open, so the kernel must refuse them."""
    needs(layers, "mnt", "uid", "landlock")
    folder, unchanged = outside
    source = ATTEMPT + f"""
fd = os.open({str(folder)!r}, os.O_RDONLY | os.O_DIRECTORY)
attempt("create", lambda: os.close(os.open("new.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)))
attempt("truncate", lambda: os.close(os.open("kept.txt", os.O_WRONLY | os.O_TRUNC, dir_fd=fd)))
attempt("append", lambda: os.write(os.open("kept.txt", os.O_WRONLY | os.O_APPEND, dir_fd=fd), b"x"))
attempt("remove", lambda: os.remove("kept.txt", dir_fd=fd))
attempt("rename", lambda: os.rename("kept.txt", "moved.txt", src_dir_fd=fd, dst_dir_fd=fd))
attempt("take", lambda: os.rename("kept.txt", os.path.join(os.getcwd(), "taken"), src_dir_fd=fd))
attempt("mkdir", lambda: os.mkdir("newdir", dir_fd=fd))
attempt("symlink", lambda: os.symlink("/etc/hostname", "link", dir_fd=fd))
attempt("link", lambda: os.link("kept.txt", os.path.join(os.getcwd(), "hard"), src_dir_fd=fd))
"""
    assert check(source, "assert escaped() == []").passed == (True,)
    assert unchanged()


def test_fd_based_chmod_chown_and_times_fail(layers, outside):
    """`os.fchmod`, `fchown`, `utime` on a descriptor, `setxattr` on a file outside, opened for reading."""
    needs(layers, "mnt", "uid", "hook")
    folder, unchanged = outside
    kept = str(folder / "kept.txt")
    source = ATTEMPT + f"""
fd = os.open({kept!r}, os.O_RDONLY)
dfd = os.open({str(folder)!r}, os.O_RDONLY | os.O_DIRECTORY)
attempt("fchmod", lambda: os.fchmod(fd, 0o777))
attempt("fchown", lambda: os.fchown(fd, 4321, 4321))
attempt("futime", lambda: os.utime(fd, (0, 0)))
attempt("chmod", lambda: os.chmod({kept!r}, 0o777))
attempt("chmod-dir-fd", lambda: os.chmod("kept.txt", 0o777, dir_fd=dfd))
attempt("xattr", lambda: os.setxattr({kept!r}, "user.x", b"1"))
"""
    assert check(source, "assert escaped() == []").passed == (True,)
    assert unchanged()


def test_replacing_what_the_hook_used_does_not_disable_it(layers, outside):
    """The old hook called `any` and `os.path.realpath` at call time; the new one binds everything it uses
    at install time. Replacing builtins, `os.path`, `posixpath` or `os.fspath`, then writing outside."""
    needs(layers, "mnt", "uid", "landlock", "hook")
    folder, unchanged = outside
    source = ATTEMPT + f"""
import builtins, posixpath
saved = (builtins.any, builtins.isinstance, posixpath.realpath, posixpath.normpath, os.fspath)
inside = lambda *a, **k: os.getcwd() + "/x"
builtins.any = lambda *a, **k: False
builtins.isinstance = lambda *a, **k: True
os.path.realpath = posixpath.realpath = posixpath.normpath = os.fspath = inside
attempt("write", lambda: open({str(folder / "kept.txt")!r}, "w").write("pwned"))
attempt("create", lambda: open({str(folder / "new.txt")!r}, "x").write("pwned"))
attempt("remove", lambda: os.remove({str(folder / "kept.txt")!r}))
builtins.any, builtins.isinstance, posixpath.realpath, posixpath.normpath, os.fspath = saved
os.path.realpath = posixpath.realpath
"""
    assert check(source, "assert escaped() == []").passed == (True,)
    assert unchanged()


def test_gc_cannot_reach_the_hook_and_processes_stay_contained(layers, outside):
    """Clearing the hook's tables through `gc.get_objects()` (refused; and they are frozensets), then
    `os.system` and `os.fork` writing outside: no process starts, or the ones that do cannot write."""
    needs(layers, "mnt", "uid", "landlock", "seccomp", "hook")
    folder, unchanged = outside
    source = ATTEMPT + f"""
import gc
def clear():
    for o in gc.get_objects():
        if isinstance(o, (set, dict)) and ("os.system" in o or "os.fork" in o):
            o.clear()
attempt("gc", clear)
attempt("system", lambda: os.system("touch {folder}/system.txt"))
def fork():
    if os.fork() == 0:
        try:
            open({str(folder / "fork.txt")!r}, "w").write("x")
        finally:
            os._exit(0)
    os.wait()
attempt("fork", fork)
"""
    check(source)
    assert unchanged()


# ------------------------------------------------------------------------------------------ 3. processes

def test_a_double_forked_setsid_process_does_not_outlive_the_check(layers, outside, listeners):
    """Fork, setsid, fork again, then write outside and send a packet 0.5 s later: killed with the PID
    namespace, or by the sweep of the tests' process (a child subreaper), or never started (seccomp, hook).
    This holds under every set; the autouse fixture checks that no process is left."""
    folder, unchanged = outside
    ports, received = listeners
    source = ATTEMPT + f"""
import time, _socket
def survivor():
    time.sleep(0.5)
    try:
        open({str(folder / "late.txt")!r}, "w").write("x")
    finally:
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        s.sendto(b"late", ("127.0.0.1", {ports["udp"]}))
        os._exit(0)
def double_fork():
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            survivor()
        os._exit(0)
    os.waitpid(pid, 0)
attempt("fork", double_fork)
"""
    check(source)
    time.sleep(0.8)
    assert unchanged()
    assert received() == []


def test_signals_to_other_processes_fail(layers, helper):
    """`os.kill`, `os.killpg`, `pidfd_send_signal` (which no audit event covers) and `kill(-1)` at a process
    of the trainer's user: another PID namespace, another uid, seccomp or a Landlock signal scope stops them."""
    needs(layers, "pid", "uid", "seccomp", "landlock-scope")
    proc, _ = helper
    source = ATTEMPT + f"""
import signal
attempt("kill", lambda: os.kill({proc.pid}, signal.SIGKILL))
attempt("killpg", lambda: os.killpg({proc.pid}, signal.SIGKILL))
attempt("pidfd", lambda: signal.pidfd_send_signal(os.pidfd_open({proc.pid}), signal.SIGKILL))
attempt("everyone", lambda: os.kill(-1, signal.SIGKILL))
"""
    check(source)
    time.sleep(0.05)
    assert proc.poll() is None


def test_a_fork_bomb_is_bounded_without_the_hook(layers):
    """With the hook's fork refusal gone, the kernel bounds it: seccomp refuses new processes, or
    RLIMIT_NPROC holds under the run's own uid (root ignores it otherwise); all die after the check."""
    needs(layers, "seccomp", "uid", "hook")
    source = ATTEMPT + """
import time
count = 0
def bomb():
    global count
    for _ in range(200):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        count += 1
attempt("bomb", bomb)
def forked():
    return count
"""
    start = time.monotonic()
    assert check(source, f"assert forked() <= {sandbox.PROCESSES}", timeout=3).passed == (True,)
    assert time.monotonic() - start < 3 + sandbox.STARTUP_S


# ------------------------------------------------------------------------------------------ 4. network

def test_no_packet_leaves(layers, listeners):
    """UDP `sendto` through `_socket` (before anything could patch `socket`), TCP connect, an abstract unix
    socket: an empty network namespace, seccomp or the hook stop each; nothing arrives."""
    needs(layers, "net", "seccomp", "hook")
    ports, received = listeners
    source = ATTEMPT + f"""
import _socket, socket
def udp():
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    s.sendto(b"leak", ("127.0.0.1", {ports["udp"]}))
attempt("udp", udp)
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", {ports["tcp"]}), timeout=0.5).sendall(b"leak"))
def unix():
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    s.sendto(b"leak", {ports["unix"]!r})
attempt("unix", unix)
"""
    assert check(source, "assert escaped() == []").passed == (True,)
    time.sleep(0.05)
    assert received() == []


# ------------------------------------------------------------------------------------------ 5. secrets

def test_other_processes_environments_are_unreadable(layers, helper):
    """`/proc/<pid>/environ` of the parent, of the trainer's process and of every other process: a fresh
    /proc of its own PID namespace, another uid, or the hook keep them out; the child's own environment is
    empty but for HOME and TMPDIR."""
    needs(layers, "mnt", "uid", "hook")
    proc, token = helper
    assert token.encode() in open(f"/proc/{proc.pid}/environ", "rb").read()  # it is there to be stolen
    source = f"""
import os
def leaked():
    needle = {token[::-1]!r}[::-1].encode()
    pids = {{{proc.pid}, {os.getpid()}, os.getppid(), 1}} | {{int(p) for p in os.listdir("/proc") if p.isdigit()}}
    hits = []
    for pid in pids:
        try:
            if needle in open(f"/proc/{{pid}}/environ", "rb").read():
                hits.append(pid)
        except OSError:
            pass
    return hits
def environment():
    return sorted(os.environ)
"""
    tests = "assert leaked() == []\nassert environment() == ['HOME', 'TMPDIR']"
    assert check(source, tests).passed == (True,)


# ------------------------------------------------------------------------------------------ 6. resources

def test_files_are_capped_in_size_and_number(layers, monkeypatch):
    """RLIMIT_FSIZE caps every file, RLIMIT_NOFILE the open descriptors (under every set); where the mount
    namespace holds, the folder is a tmpfs of DISK_MB, so many files cannot fill the disk either."""
    monkeypatch.setattr(sandbox, "DISK_MB", 4)
    source = """
import os
def sizes():
    out = []
    for name in ("big0", "big1", "big2"):
        try:
            with open(name, "wb") as f:
                for _ in range(6):
                    f.write(b"\\0" * (1 << 20))
        except OSError:
            pass
        out.append(os.path.getsize(name) if os.path.exists(name) else 0)
    return out
def descriptors():
    fds = []
    try:
        for _ in range(200):
            fds.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    return len(fds)
"""
    tests = "s = sizes()\nassert max(s) <= 4 << 20\nassert descriptors() < 64"
    if "mnt" in layers:
        tests += "\nassert sum(s) <= 4 << 20"
    assert check(source, tests).passed == (True,)


def test_layers_reported_where_the_kernel_allows_them():
    """On a machine that allows unshare, root and Landlock (this one, when these tests were written), a
    check gets every layer; elsewhere the missing ones are simply absent from the report."""
    held = sandbox.run_tests("x = 1", ["assert x == 1"]).isolation
    assert "hook" in held
    if os.geteuid() == 0 and sandbox.uid_span() is not None:
        assert "uid" in held
