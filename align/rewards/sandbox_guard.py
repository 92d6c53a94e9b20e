"""The audit hook (PEP 578) over the OS fences of the solution's process: the last layer, and the only one
where the kernel allows none of the others. Stdlib only: the child imports it in a bare `python -I -S`.
"""

from __future__ import annotations

import os
import sys


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
