"""The tests' end of a `python_tests` check: the solution's objects as `Remote` handles.

Comparisons and arithmetic between a handle and a plain value happen in the tests' process on the handle's
plain value, so a solution never learns an expected value from a comparison and cannot answer "equal" to
everything. Anything the tests pass that is neither plain data nor one of the solution's own objects is
refused (TypeError). Stdlib only, and only cheap modules, since `sandbox_child.py` imports it in a bare
`python -I -S`.
"""

from __future__ import annotations

import _operator as operator  # not `operator`: 2 ms of a check's startup
import builtins
import sys

if __package__:  # imported as part of `align` (by a test, say)
    from align.rewards.sandbox_wire import MUTABLE, Dead, Ref, TimedOut, dumps, frame, loads, recv_bytes, send_raw
else:  # in the child, where `sandbox.BOOT` loaded the sandbox modules as top-level modules first
    from sandbox_wire import MUTABLE, Dead, Ref, TimedOut, dumps, frame, loads, recv_bytes, send_raw

# Modules the tests' process imports itself when the solution's namespace names one (`import math` in the
# solution, `math.isclose` in the tests): side-effect free, so a solution cannot make the tests import
# anything else, and cannot make a module's functions lie. Any other module is a handle.
LOCAL_MODULES = frozenset({
    "math", "cmath", "itertools", "functools", "operator", "collections", "heapq", "bisect", "string",
    "re", "statistics", "fractions", "decimal", "numbers", "random", "copy", "typing", "dataclasses",
    "enum", "array", "textwrap", "unicodedata", "datetime", "json", "hashlib", "struct",
})


class Client:
    """The tests' end of the pipe: sends requests, turns replies into values, handles and exceptions."""

    def __init__(self, wfd: int, rfd: int):
        self.wfd, self.rfd = wfd, rfd
        self.deadline: float | None = None
        self.broken = False
        self.remotes: dict[int, Remote] = {}
        self.exceptions: dict[int, type] = {}

    def handle(self, ref: Ref):
        if ref.module is not None:
            if ref.module in LOCAL_MODULES:
                __import__(ref.module)
                return sys.modules[ref.module]
        elif ref.base is not None:
            return self.exception_class(ref.hid, ref.base, ref.name)
        if ref.hid not in self.remotes:
            self.remotes[ref.hid] = Remote(self, ref.hid)
        return self.remotes[ref.hid]

    def exception_class(self, hid: int, base, name) -> type:
        """A real exception class standing for one of the solution's, so `except TheirError:` works."""
        if hid not in self.exceptions:
            parent = getattr(builtins, base, None) if isinstance(base, str) else None
            if not (isinstance(parent, type) and issubclass(parent, Exception)):
                parent = Exception
            cls = type(name if isinstance(name, str) and name.isidentifier() else "Error", (parent,), {})
            cls._sandbox_handle = hid
            self.exceptions[hid] = cls
        return self.exceptions[hid]

    def ref(self, x) -> Ref:
        if type(x) is Remote and x._client is self:
            return Ref(x._hid)
        if isinstance(x, type) and self.exceptions.get(getattr(x, "_sandbox_handle", None)) is x:
            return Ref(x._sandbox_handle)
        raise TypeError(f"a {type(x).__name__} cannot be passed to the solution (plain data or its own objects)")

    def value(self, data: bytes):
        try:
            return loads(data, self.handle)
        except Dead:
            self.broken = True
            raise

    def request(self, op: str, *args):
        return self.exchange(op, list(args))[1]

    def exchange(self, op: str, args: list):
        """Send one request, wait (until `deadline`) for its reply: the ("ok", value, after) tuple."""
        message = dumps((op, args), self.ref)  # a TypeError here is the test's own: nothing was sent
        if self.broken:
            raise Dead("the solution's process is gone")
        try:
            send_raw(self.wfd, frame(message))
            reply = self.value(recv_bytes(self.rfd, self.deadline))
        except (OSError, Dead, TimedOut):
            self.broken = True
            raise
        if type(reply) is tuple and len(reply) == 4 and reply[0] == "err":
            raise self.error(reply[1:])
        if not (type(reply) is tuple and len(reply) == 3 and reply[0] == "ok"):
            self.broken = True
            raise Dead("malformed reply")
        return reply

    def error(self, err: tuple) -> BaseException:
        """The solution's exception, as the builtin class it derives from (or its stand-in class)."""
        base, message, own = err
        message = message if type(message) is str else "?"
        if isinstance(own, type) and issubclass(own, Exception):
            return own(message)
        cls = getattr(builtins, base, None) if type(base) is str else None
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(message)
        return RuntimeError(f"{base}: {message}")  # never SystemExit, KeyboardInterrupt or a Dead

    def call(self, remote: Remote, args: tuple, kwargs: dict):
        """Call a handle; lists, dicts, sets the call mutated are updated in place, as in one process."""
        _, result, after = self.exchange("call", [remote, list(args), kwargs])
        if type(after) is list and len(after) == len(args):
            for original, new in zip(args, after):
                if new is not None and type(original) in MUTABLE:
                    _update(original, new)
        return result


def _update(original, new) -> None:
    if type(new) is not type(original):
        raise Dead("a mutated argument changed type")
    if type(original) in (list, bytearray):
        original[:] = new
    else:
        original.clear()
        original.update(new)


_NO = object()


def _plain(remote: Remote):
    """The handle's plain value, fetched afresh (it may have changed), or _NO."""
    try:
        value = remote._client.request("plain", remote)
    except Exception:  # noqa: BLE001 - no plain value: the comparison is not supported
        return _NO
    return _NO if type(value) is Remote else value


def _binary(name: str, swap: bool = False):
    """A binary operator on a handle: on its plain value in this process when the other side is plain,
    by the solution only when both sides are its own objects (it learns no expected value either way)."""
    def method(self, other):
        if type(other) is Remote:
            a, b = (other, self) if swap else (self, other)
            return self._client.request(name, a, b)
        mine = _plain(self)
        if mine is _NO:
            return NotImplemented
        a, b = (other, mine) if swap else (mine, other)
        return getattr(operator, name)(a, b)
    return method


def _unary(name: str, check: type | None = None):
    """A unary operation answered by the solution; `check`: the type the answer must have."""
    def method(self):
        value = self._client.request(name, self)
        if check is not None and type(value) is not check:
            raise TypeError(f"{name}() of a solution object returned {type(value).__name__}")
        return value
    return method


def _on_plain(fn):
    def method(self, *args):
        mine = _plain(self)
        if mine is _NO:
            raise TypeError("a solution object without a plain value")
        return fn(mine, *args)
    return method


class Remote:
    """One of the solution's objects, seen from the tests' process."""

    __slots__ = ("_client", "_hid")

    def __init__(self, client: Client, hid: int):
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_hid", hid)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._client.request("getattr", self, name)

    def __setattr__(self, name, value):
        self._client.request("setattr", self, name, value)

    def __delattr__(self, name):
        self._client.request("delattr", self, name)

    def __call__(self, *args, **kwargs):
        return self._client.call(self, args, kwargs)

    def __getitem__(self, key):
        return self._client.request("getitem", self, key)

    def __setitem__(self, key, value):
        self._client.request("setitem", self, key, value)

    def __delitem__(self, key):
        self._client.request("delitem", self, key)

    def __contains__(self, item):
        mine = _plain(self)
        return item in mine if mine is not _NO else self._client.request("contains", self, item) is True

    def __next__(self):
        try:
            return self._client.request("next", self)
        except StopIteration:
            raise StopIteration from None

    def __instancecheck__(self, obj):
        return self._client.request("isinstance", obj, self) is True

    def __subclasscheck__(self, cls):
        return self._client.request("issubclass", cls, self) is True

    def __format__(self, spec):
        return format(self.__str__(), spec) if not spec else _on_plain(format)(self, spec)

    __len__ = _unary("len", int)
    __bool__ = _unary("bool", bool)
    __str__ = _unary("str", str)
    __repr__ = _unary("repr", str)
    __hash__ = _unary("hash", int)
    __iter__ = _unary("iter")
    __neg__, __pos__, __abs__, __invert__ = (_on_plain(f) for f in (operator.neg, operator.pos, abs, operator.invert))
    __int__, __float__, __index__ = _on_plain(int), _on_plain(float), _on_plain(operator.index)
    __round__ = _on_plain(round)
    __eq__, __ne__ = _binary("eq"), _binary("ne")
    __lt__, __le__, __gt__, __ge__ = _binary("lt"), _binary("le"), _binary("gt"), _binary("ge")


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lshift", "rshift"):
    _op = _name + "_" if _name in ("and", "or") else _name
    setattr(Remote, f"__{_name}__", _binary(_op))
    setattr(Remote, f"__r{_name}__", _binary(_op, swap=True))
del _name, _op
