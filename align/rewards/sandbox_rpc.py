"""The solution's end of a `python_tests` check: its process runs the solution and answers the tests.

The solution runs in one process (`Server`, here), the tests in another (`sandbox_remote.Client`), so the
verdict is decided by code the solution cannot reach. The tests see the solution's top-level names
through handles: a call crosses the pipe (`sandbox_wire`) with its arguments as plain data and comes
back as plain data (or a new handle). Anything the solution returns that is not plain crosses as a
handle. Stdlib only, and only cheap modules, since `sandbox_child.py` imports it in a bare `python -I -S`.
"""

from __future__ import annotations

import _operator as operator  # not `operator`: 2 ms of a check's startup
import builtins
import sys

if __package__:  # imported as part of `align` (by a test, say)
    from align.rewards.sandbox_wire import MUTABLE, Dead, Ref, dumps, frame, recv, send, send_raw
else:  # in the child, where `sandbox.BOOT` loaded the sandbox modules as top-level modules first
    from sandbox_wire import MUTABLE, Dead, Ref, dumps, frame, recv, send, send_raw

_BINARY = frozenset({"eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv", "floordiv", "mod",
                     "pow", "matmul", "and_", "or_", "xor", "lshift", "rshift", "contains"})

_UNARY = frozenset({"neg", "pos", "abs", "invert", "index", "len", "bool", "str", "repr", "hash", "iter",
                    "next", "int", "float"})


class NoPlain(Exception):
    """The object has no plain value (a class instance of the solution's own)."""


def plain_of(x):
    """The plain value behind a subclass of a plain type (namedtuple, Counter, numpy scalar and array)."""
    for base in (bool, int, float, complex, str, bytes, bytearray, tuple, list, dict, set, frozenset):
        if isinstance(x, base):
            return base(x)
    tolist = getattr(type(x), "tolist", None)
    if callable(tolist):
        return x.tolist()
    raise NoPlain(type(x).__name__)


def _exception_base(cls) -> str | None:
    """The name of the builtin exception class `cls` derives from, if it is an exception class."""
    if isinstance(cls, type) and issubclass(cls, BaseException):
        for klass in cls.__mro__:
            if getattr(builtins, klass.__name__, None) is klass:
                return klass.__name__
    return None


class Server:
    """Runs the solution and answers the tests' requests about its objects (in the solution's process)."""

    def __init__(self, rfd: int, wfd: int, debug: bool = False):
        self.rfd, self.wfd, self.debug = rfd, wfd, debug
        self.objects: dict[int, object] = {}
        self.ids: dict[int, int] = {}

    def ref(self, obj) -> Ref:
        """A handle for `obj`, which stays alive here so its number keeps meaning the same object."""
        key = id(obj)
        if key not in self.ids:
            self.ids[key] = len(self.objects)
            self.objects[self.ids[key]] = obj
        hid, name = self.ids[key], getattr(obj, "__name__", None)
        name = name if type(name) is str else None
        if type(obj) is type(sys):
            return Ref(hid, module=name)
        base = _exception_base(obj)
        return Ref(hid, base=base, name=name) if base else Ref(hid)

    def lookup(self, ref: Ref):
        if ref.hid not in self.objects:
            raise ValueError("unknown handle")
        return self.objects[ref.hid]

    def load(self, source: str) -> None:
        """Run the solution as `__main__`; tell the tests its top-level names, or that it failed."""
        module = type(sys)("__main__")
        module.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = module
        try:
            exec(compile(source, "solution.py", "exec"), module.__dict__)
            names = {k: v for k, v in module.__dict__.items() if not k.startswith("__")}
            reply = dumps(("loaded", names), self.ref)
        except BaseException as err:  # noqa: BLE001 - SystemExit too: the solution did not load
            if self.debug:
                import traceback
                traceback.print_exc()
            send(self.wfd, ("failed", type(err).__name__))
            return
        send_raw(self.wfd, frame(reply))
        self.serve()

    def serve(self) -> None:
        while True:
            try:
                request = recv(self.rfd, None, self.lookup)
            except Dead:
                return
            send_raw(self.wfd, self.answer(request))

    def answer(self, request) -> bytes:
        """The framed reply: ("ok", result, mutated arguments) or ("err", base class, message, own class)."""
        try:
            op, args = request
            if op == "call":
                fn, pos, kw = args
                result = fn(*pos, **kw)
                after = [a if type(a) in MUTABLE else None for a in pos]
                return frame(dumps(("ok", result, after), self.ref))
            return frame(dumps(("ok", self.operation(op, args), None), self.ref))
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the tests as an exception
            try:
                cls = type(err)
                base = _exception_base(cls) or "Exception"
                own = self.ref(cls) if base != cls.__name__ else None
                return frame(dumps(("err", base, str(err)[:2000], own)))
            except BaseException:  # noqa: BLE001 - a hostile __str__, an unencodable Ref
                return frame(dumps(("err", "Exception", "unprintable error", None)))

    def operation(self, op: str, args: list):
        if op == "getattr":
            return getattr(args[0], args[1])
        if op == "setattr":
            return setattr(args[0], args[1], args[2])
        if op == "delattr":
            return delattr(args[0], args[1])
        if op == "getitem":
            return args[0][args[1]]
        if op == "setitem":
            args[0][args[1]] = args[2]
            return None
        if op == "delitem":
            del args[0][args[1]]
            return None
        if op == "plain":
            return plain_of(args[0])
        if op == "isinstance":
            return isinstance(args[0], args[1])
        if op == "issubclass":
            return issubclass(args[0], args[1])
        if op in _BINARY:
            return getattr(operator, op)(args[0], args[1])
        if op in _UNARY:
            fn = {"len": len, "bool": bool, "str": str, "repr": repr, "hash": hash, "iter": iter, "next": next,
                  "int": int, "float": float}.get(op) or getattr(operator, op)
            return fn(args[0])
        raise ValueError(f"unknown operation {op!r}")
