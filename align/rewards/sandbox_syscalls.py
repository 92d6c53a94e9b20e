"""The kernel's numbers and the libc calls the sandbox's fences are built from (`unshare`, `mount`, `prctl`,
`capset`): Python 3.11 has no os.unshare, mount or prctl, so they go through ctypes, loaded once, in trusted
code. Stdlib only: the child imports it in a bare `python -I -S`.
"""

from __future__ import annotations

import os

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x20000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 4, 28, 38, 36

SECBIT_NOROOT, SECBIT_NOROOT_LOCKED, SECBIT_KEEP_CAPS, CAP_DAC_READ_SEARCH = 1, 1 << 1, 1 << 4, 2

_LIBC = None


def load_libc():
    """libc through ctypes (Python 3.11 has no os.unshare, mount or prctl); loaded once, in trusted code."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def libc_call(name: str, *args) -> None:
    import ctypes
    if getattr(load_libc(), name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def prctl(option: int, value: int) -> None:
    import ctypes
    libc_call("prctl", option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


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
    libc_call("mount", as_c(source), as_c(target), as_c(fstype), ctypes.c_ulong(flags), as_c(data))


def set_capabilities(mask: int) -> None:
    """Effective and permitted capabilities to `mask` (a bit per capability below 32), none inheritable."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    data[0].effective = data[0].permitted = mask
    libc_call("capset", ctypes.byref(Header(0x20080522, 0)), data)
