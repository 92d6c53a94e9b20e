"""Landlock for the solution's process: writes only beneath its folder, no execution, no TCP, no signals
out of its domain; no privilege needed. Stdlib only: the child imports it in a bare `python -I -S`.
"""

from __future__ import annotations

import os
import struct

if __package__:  # imported as part of `align` (by a test, say)
    from align.rewards.sandbox_syscalls import load_libc
else:  # in the child, where `sandbox.BOOT` loaded the sandbox modules as top-level modules first
    from sandbox_syscalls import load_libc

# Landlock: syscall numbers (the same on every architecture), filesystem rights that write, TCP, scopes.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446

LANDLOCK_WRITES = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13))  # write, remove, make, refer

LANDLOCK_EXECUTE, LANDLOCK_TRUNCATE, LANDLOCK_TCP, LANDLOCK_SCOPES = 1, 1 << 14, 0b11, 0b11


def landlock(box: str) -> int:
    """Landlock (Linux 5.19+, no privilege needed): writes, removals and creations only beneath `box` (and
    /dev/null), no execution, no TCP (ABI 4, 6.7+), no signals or abstract sockets beyond this process's
    domain (ABI 6, 6.12+). Its ABI, or 0 where the kernel lacks it (ABI 1 is skipped: it refuses renames
    between folders)."""
    import ctypes
    libc = load_libc()
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
