"""The seccomp filter of the solution's process (through libseccomp, where installed): the system calls a
solution never needs answer EPERM. Stdlib only: the child imports it in a bare `python -I -S`.
"""

from __future__ import annotations

import os

CLONE_THREAD, EPERM, ENOSYS = 0x10000, 1, 38

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
