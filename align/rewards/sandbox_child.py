"""The program behind a `python_tests` check, run by `sandbox.py` in a bare `python -I -S -B` (stdlib only).

It starts as the tests' process (T). T reads its config from stdin, limits itself, unshares PID, network and
IPC namespaces where the kernel lets it, and forks the solution's process (S). S, still running trusted code,
gets a private read-only view of the filesystem with a size-capped tmpfs as its folder and a fresh /proc,
rlimits, an unused uid (when we are root), no_new_privs, Landlock, a seccomp filter and an audit hook; only
then does it run the solution and serve the tests' requests (`sandbox_rpc.Server`). T reads the tests and a
nonce from stdin only after the fork, so S never holds them, runs them against S's objects, and writes one
verdict line per test block to a pipe only it holds. Then it kills S and everything S started. A layer the
kernel refuses is skipped and left out of the last line, so the parent knows what held.
"""

from __future__ import annotations

import builtins
import os
import _signal as signal  # not `signal`: it imports enum, 10 ms of a check's startup
import resource
import struct
import sys
import time

if __package__:  # imported as part of `align` (by a test, say)
    from align.rewards import sandbox_rpc as rpc
else:  # in the child, where `sandbox.BOOT` loaded sandbox_rpc as a top-level module first
    import sandbox_rpc as rpc

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x20000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 4, 28, 38, 36
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED, SECBIT_KEEP_CAPS, CAP_DAC_READ_SEARCH = 1, 1 << 1, 1 << 4, 2
CLONE_THREAD, EPERM, ENOSYS = 0x10000, 1, 38
# Landlock: syscall numbers (the same on every architecture), filesystem rights that write, TCP, scopes.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_WRITES = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13))  # write, remove, make, refer
LANDLOCK_EXECUTE, LANDLOCK_TRUNCATE, LANDLOCK_TCP, LANDLOCK_SCOPES = 1, 1 << 14, 0b11, 0b11
# System calls a solution never needs, each a way out or a way to reach another process. Process creation
# (fork, vfork, clone without CLONE_THREAD) and signals to other processes are refused by argument below.
SECCOMP_REFUSED = (
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open",
    "pidfd_send_signal", "pidfd_getfd", "kcmp", "tkill", "socket", "socketpair", "unshare", "setns", "mount",
    "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick",
    "mount_setattr", "open_by_handle_at", "name_to_handle_at", "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "iopl", "ioperm", "quotactl", "process_madvise",
)
_LIBC = None
DEBUG = False  # tracebacks of failing test blocks on stderr (ALIGN_SANDBOX_DEBUG=1 in the trainer)


# ------------------------------------------------------------------------------------------ system calls

def _libc():
    """libc through ctypes (Python 3.11 has no os.unshare, mount or prctl); loaded once, in trusted code."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _call(name: str, *args) -> None:
    import ctypes
    if getattr(_libc(), name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def prctl(option: int, value: int) -> None:
    import ctypes
    _call("prctl", option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def try_prctl(option: int, value: int) -> bool:
    """A best-effort prctl: where a container refuses it, the check goes on without that layer."""
    try:
        prctl(option, value)
    except OSError:
        return False
    return True


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    import ctypes
    as_c = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _call("mount", as_c(source), as_c(target), as_c(fstype), ctypes.c_ulong(flags), as_c(data))


def set_capabilities(mask: int) -> None:
    """Effective and permitted capabilities to `mask` (a bit per capability below 32), none inheritable."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    data[0].effective = data[0].permitted = mask
    _call("capset", ctypes.byref(Header(0x20080522, 0)), data)


# ------------------------------------------------------------------------------------------ tests' process

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
        _call("unshare", CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | (CLONE_NEWUSER if user else 0))
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


def run_tests(client: rpc.Client, names: bytes, blocks: list[str], timeout: float, report) -> None:
    """Each block in a fresh namespace holding the solution's names; `report(i, passed)` after each. The
    first block shares its `timeout` with loading the solution (the deadline the client already has)."""
    for i, block in enumerate(blocks):
        if i:
            client.deadline = time.monotonic() + timeout
        report(i, run_block(client, names, block))


def run_block(client: rpc.Client, names: bytes, block: str) -> bool:
    """Whether `block` runs to its end with the solution alive, answering in time."""
    if client.broken:
        return False
    expired = []

    def alarm(signum, frame):
        expired.append(True)
        raise rpc.TimedOut()

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
    cfg = rpc.recv(0)
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
    tests = rpc.recv(0)
    os.close(0)
    nonce = tests["nonce"]
    client = rpc.Client(to_s[1], from_s[0])
    client.deadline = time.monotonic() + cfg["timeout"]
    report = lambda i, ok: os.write(verdict, f"{nonce} {i} {int(ok)}\n".encode())  # noqa: E731
    names = None
    try:
        _, layers = rpc.recv(from_s[0], client.deadline)  # sent by the fence code, before the solution ran
        names = rpc.recv_bytes(from_s[0], client.deadline)
        loaded = client.value(names)
        if not (type(loaded) is tuple and len(loaded) == 2 and loaded[0] == "loaded" and type(loaded[1]) is dict):
            names = None
    except (rpc.Dead, rpc.TimedOut, ValueError):
        names = None
    if names is None:
        for i in range(len(tests["blocks"])):
            report(i, False)
    else:
        run_tests(client, names, tests["blocks"], cfg["timeout"], report)
    kill_solution(pid, "pid" in layers)
    os.write(verdict, f"{nonce} end {','.join(layers) or 'none'}\n".encode())


# ------------------------------------------------------------------------------------------ solution's process

def solution_process(cfg: dict, layers: list[str], rfd: int, wfd: int) -> None:
    """Fence this process in, then run the solution and serve the tests; never returns."""
    try:
        try_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        quiet_descriptors(keep=(rfd, wfd) + ((2,) if DEBUG else ()))
        box, uid = cfg["dir"], cfg["uid"]
        if uid is not None:
            uid = give_folder(box, uid)
        if "pid" in layers and private_filesystem(box, uid, cfg["disk_mb"]):
            layers = layers + ["mnt"]
        os.chdir(box)
        limit_solution(cfg)
        os.environ.clear()
        os.environ.update({"HOME": box, "TMPDIR": box})
        if uid is not None and drop_privileges(uid):
            layers = layers + ["uid"]
        elif "user" in layers:  # root of its user namespace: give every capability there up, for good
            prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED)
            set_capabilities(0)
        allowed = cfg["layers"] if try_prctl(PR_SET_NO_NEW_PRIVS, 1) else ["hook"]  # Landlock, seccomp need it
        abi = landlock(box) if "landlock" in allowed else 0
        if abi:
            layers = layers + ["landlock"] + (["landlock-tcp"] if abi >= 4 else []) + (
                ["landlock-scope"] if abi >= 6 else [])
        if "seccomp" in allowed and seccomp():
            layers = layers + ["seccomp"]
        if "hook" in allowed:
            install_guard(box)
            layers = layers + ["hook"]
        rpc.send(wfd, ("ready", layers))
    except BaseException:  # noqa: BLE001 - a fence that fails to go up must not run the solution
        os._exit(3)
    rpc.Server(rfd, wfd, DEBUG).load(cfg["source"])
    os._exit(0)


def quiet_descriptors(keep: tuple[int, ...]) -> None:
    """stdin, stdout and stderr on /dev/null; every other descriptor but `keep` closed (the tests' stdin and
    the verdict pipe included)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in keep:
            os.dup2(null, fd)
    edges = sorted(fd for fd in set(keep) if fd > 2)
    low = 3
    for fd in edges:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
                "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}


def _mounts() -> list[tuple[str, int]]:
    """Each mount point, with the flags it has now (a read-only remount must keep them: /dev needs dev)."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            point = fields[4]
            for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(escaped, char)  # mountinfo's octal escapes
            flags = sum(_MOUNT_FLAGS.get(option, 0) for option in fields[5].split(","))
            mounts.append((point, flags))
    return mounts


def private_filesystem(box: str, uid: int | None, disk_mb: int) -> bool:
    """A private mount namespace: every mount read-only, a fresh tmpfs (size-capped) as the solution's
    folder, a /proc showing only its PID namespace. False where the kernel refuses (then uid and rlimits
    remain)."""
    try:
        _call("unshare", CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        for point, flags in _mounts():
            mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | flags)
        owner = f",uid={uid},gid={uid}" if uid is not None else ""
        mount("tmpfs", box, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              f"size={disk_mb}m,nr_inodes=4096,mode=0700{owner}")
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        return False
    return True


def limit_solution(cfg: dict) -> None:
    """Per-file size, open files and processes (threads count) for the solution."""
    def cap(kind: int, value: int) -> None:
        _, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))

    cap(resource.RLIMIT_FSIZE, cfg["disk_mb"] << 20)
    cap(resource.RLIMIT_NOFILE, 64)
    # Under its own uid the count is the solution's alone; otherwise it is on top of what the user runs.
    cap(resource.RLIMIT_NPROC, cfg["processes"] + (0 if cfg["uid"] is not None else user_process_count()))


def user_process_count() -> int:
    """How many processes and threads this user runs now (RLIMIT_NPROC counts them all)."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


def give_folder(box: str, uid: int) -> int | None:
    """The solution's folder to `uid`; None (no uid layer) where the filesystem refuses the chown."""
    try:
        os.chown(box, uid, uid)
    except OSError:
        return None
    return uid


def drop_privileges(uid: int) -> bool:
    """Become `uid` (unused by anyone else: other processes and files are out of its reach, RLIMIT_NPROC
    holds), keeping only the capability to read, so it may write nothing outside its folder. False where
    the kernel refuses (then the process stays as it was, and the other layers hold)."""
    try:
        prctl(PR_SET_SECUREBITS, SECBIT_KEEP_CAPS)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    except OSError:
        return False
    set_capabilities(1 << CAP_DAC_READ_SEARCH)  # reads (and imports) what the trainer can: e.g. under a 0700 /root
    return True


def landlock(box: str) -> int:
    """Landlock (Linux 5.19+, no privilege needed): writes, removals and creations only beneath `box` (and
    /dev/null), no execution, no TCP (ABI 4, 6.7+), no signals or abstract sockets beyond this process's
    domain (ABI 6, 6.12+). Its ABI, or 0 where the kernel lacks it (ABI 1 is skipped: it refuses renames
    between folders)."""
    import ctypes
    libc = _libc()
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 2:
        return 0
    fs = LANDLOCK_WRITES | LANDLOCK_EXECUTE | (LANDLOCK_TRUNCATE if abi >= 3 else 0)
    fields = [fs] + ([LANDLOCK_TCP] if abi >= 4 else []) + ([LANDLOCK_SCOPES] if abi >= 6 else [])
    attr = (ctypes.c_uint64 * len(fields))(*fields)
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(ctypes.sizeof(attr)),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    try:
        for path, rights in ((box, fs & ~LANDLOCK_EXECUTE), (os.devnull, (1 << 1) | (fs & LANDLOCK_TRUNCATE))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = struct.pack("=QI", rights, fd)  # struct landlock_path_beneath_attr is packed
            code = libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.c_char_p(rule), ctypes.c_uint32(0))
            os.close(fd)
            if code != 0:
                return 0
        return abi if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) == 0 else 0
    finally:
        os.close(ruleset)


def seccomp() -> bool:
    """A seccomp filter through libseccomp (where installed): no new processes (threads are fine), no
    signals to others, no sockets, none of `SECCOMP_REFUSED`; each answers EPERM. False without the library."""
    import ctypes

    class Cmp(ctypes.Structure):  # struct scmp_arg_cmp
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return False
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(Cmp)]
    lib.seccomp_load.argtypes = lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(ctypes.c_uint32(0x7FFF0000))  # SCMP_ACT_ALLOW: a deny list
    if not ctx:
        return False
    errno = lambda e: 0x00050000 | e  # noqa: E731 - SCMP_ACT_ERRNO(e)
    ne, masked_eq, me = 1, 7, os.getpid()
    rules = [(name, EPERM, []) for name in SECCOMP_REFUSED] + [
        ("clone", EPERM, [Cmp(0, masked_eq, CLONE_THREAD, 0)]),  # a process, not a thread
        ("clone3", ENOSYS, []),  # its flags are behind a pointer; ENOSYS makes libc fall back to clone
        ("kill", EPERM, [Cmp(0, ne, me, 0)]), ("tgkill", EPERM, [Cmp(0, ne, me, 0)]),
        ("rt_sigqueueinfo", EPERM, [Cmp(0, ne, me, 0)]), ("rt_tgsigqueueinfo", EPERM, [Cmp(0, ne, me, 0)])]
    try:
        for name, code, cmps in rules:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not on this architecture
            array = (Cmp * max(len(cmps), 1))(*cmps)
            if lib.seccomp_rule_add_array(ctx, errno(code), number, len(cmps), array) != 0:
                return False
        return lib.seccomp_load(ctx) == 0
    finally:
        lib.seccomp_release(ctx)


# ------------------------------------------------------------------------------------------ audit hook

def install_guard(box: str) -> None:
    """A second layer over the OS fences (PEP 578 hook): refuses writes outside `box`, new processes, signals
    to others, sockets, ctypes, gc walks, tracing and code swaps. It reads nothing it could be tricked
    with: every helper is bound as a default argument at install time (no globals, no closure cells), its
    tables are frozensets, nothing references it, and gc walks and trace functions (which could jump over
    its `raise`) are refused, so it can be neither found nor disabled. A path-like object's __fspath__
    can still answer differently the second time: that is what the OS layers are for."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    paths = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
             "os.rename": ((0, 1), (2, 3)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
             "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)), "shutil.rmtree": ((0,), (1,)),
             "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)), "os.chdir": ((0,), ()),
             "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "sqlite3.connect": ((0,), ())}
    refused = frozenset({"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                         "subprocess.Popen", "os.symlink", "os.link", "socket.__new__", "gc.get_objects",
                         "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile"})
    native = frozenset({"_ctypes", "ctypes", "_posixsubprocess"})
    watched = frozenset(paths) | refused | {"open", "import", "os.kill", "os.killpg", "object.__setattr__"}
    table = tuple(sorted(paths.items()))
    sys.addaudithook(_make_hook(box, write_flags, table, refused, native, watched))


def _make_hook(box, write_flags, table, refused, native, watched):
    def hook(event, args, _box=box, _prefix=box + "/", _flags=write_flags, _table=table, _refused=refused,
             _native=native, _watched=watched, _str=str, _bytes=bytes, _int=int, _type=type, _len=len,
             _fspath=os.fspath, _pid=os.getpid(), _startswith=str.startswith, _split=str.split, _join="/".join,
             _decode=bytes.decode, _isdigit=str.isdigit, _err=PermissionError):
        if event not in _watched:
            if _startswith(event, "ctypes."):
                raise _err(f"sandbox: {event} is not allowed")
            return

        def normal(path):  # absolute, without `.`, `..` or doubled slashes; by string alone
            path = _fspath(path)
            if _type(path) is _bytes:
                path = _decode(path, "utf-8", "surrogateescape")
            if not _startswith(path, "/"):
                path = _prefix + path
            parts = []
            for part in _split(path, "/"):
                if part == "..":
                    if parts:
                        parts.pop()
                elif part and part != ".":
                    parts.append(part)
            return "/" + _join(parts)

        def inside(path):
            if _type(path) is _int:
                return False
            path = normal(path)
            return path == _box or _startswith(path, _prefix) or path == "/dev/null"

        if event in _refused:
            raise _err(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if _type(path) is _int:
                return
            writes = (("w" in mode or "a" in mode or "x" in mode or "+" in mode) if _type(mode) is _str
                      else bool((flags or 0) & _flags))
            if writes and not inside(path):
                raise _err(f"sandbox: writing {path!r} outside the sandbox folder")
            parts = _split(normal(path), "/")
            if _len(parts) > 2 and parts[1] == "proc" and _isdigit(parts[2]) and parts[2] != _str(_pid):
                raise _err("sandbox: other processes' /proc entries are not readable")
        elif event == "import":
            if args[0] in _native:
                raise _err(f"sandbox: importing {args[0]} is not allowed")
        elif event in ("os.kill", "os.killpg"):
            if args[0] != _pid or event == "os.killpg":
                raise _err(f"sandbox: {event} is not allowed")
        elif event == "object.__setattr__":
            if args[1] == "__code__":
                raise _err("sandbox: replacing a function's __code__ is not allowed")
        else:
            for position, spec in _table:
                if position == event:
                    path_at, dir_fd_at = spec
                    for i in path_at:
                        if i < _len(args) and args[i] is not None and not (
                                event == "sqlite3.connect" and args[i] == ":memory:") and not inside(args[i]):
                            raise _err(f"sandbox: {event} on {args[i]!r} outside the sandbox folder")
                    for i in dir_fd_at:
                        if i < _len(args) and args[i] not in (None, -1):
                            raise _err(f"sandbox: {event} with dir_fd is not allowed")
    return hook


if __name__ == "__main__":
    main()
