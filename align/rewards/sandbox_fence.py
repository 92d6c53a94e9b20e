"""The solution's process (S), fenced in before it runs a line of the solution: its descriptors, a private
read-only filesystem with a size-capped tmpfs as its folder, rlimits, an unused uid, no_new_privs,
Landlock, seccomp and the audit hook; then it serves the tests (`sandbox_rpc.Server`). A fence that fails
to go up ends the process before the solution runs. Stdlib only: the child imports it in a bare
`python -I -S`.
"""

from __future__ import annotations

import os
import _signal as signal  # not `signal`: it imports enum, 10 ms of a check's startup
import resource

if __package__:  # imported as part of `align` (by a test, say)
    from align.rewards.sandbox_syscalls import (
        CLONE_NEWNS, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT,
        PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, PR_SET_SECUREBITS, SECBIT_KEEP_CAPS, SECBIT_NOROOT,
        SECBIT_NOROOT_LOCKED, CAP_DAC_READ_SEARCH, libc_call, mount, prctl, set_capabilities, try_prctl,
    )
    from align.rewards.sandbox_landlock import landlock
    from align.rewards.sandbox_seccomp import seccomp
    from align.rewards.sandbox_guard import install_guard
    from align.rewards import sandbox_rpc as rpc
    from align.rewards import sandbox_wire as wire
else:  # in the child, where `sandbox.BOOT` loaded the sandbox modules as top-level modules first
    from sandbox_syscalls import (
        CLONE_NEWNS, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT,
        PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, PR_SET_SECUREBITS, SECBIT_KEEP_CAPS, SECBIT_NOROOT,
        SECBIT_NOROOT_LOCKED, CAP_DAC_READ_SEARCH, libc_call, mount, prctl, set_capabilities, try_prctl,
    )
    from sandbox_landlock import landlock
    from sandbox_seccomp import seccomp
    from sandbox_guard import install_guard
    import sandbox_rpc as rpc
    import sandbox_wire as wire


def solution_process(cfg: dict, layers: list[str], rfd: int, wfd: int) -> None:
    """Fence this process in, then run the solution and serve the tests; never returns."""
    try:
        try_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        quiet_descriptors(keep=(rfd, wfd) + ((2,) if cfg["debug"] else ()))
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
        wire.send(wfd, ("ready", layers))
    except BaseException:  # noqa: BLE001 - a fence that fails to go up must not run the solution
        os._exit(3)
    rpc.Server(rfd, wfd, cfg["debug"]).load(cfg["source"])
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
        libc_call("unshare", CLONE_NEWNS)
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
