"""The wire between the two processes of a `python_tests` check: the solution's and the tests'.

The solution runs in one process (`Server`), the tests in another (`Client`), so the verdict is decided by
code the solution cannot reach. The tests see the solution's top-level names through `Remote` handles: a
call crosses the pipe with its arguments as plain data and comes back as plain data (or a new handle).
Comparisons and arithmetic between a handle and a plain value happen in the tests' process on the handle's
plain value, so a solution never learns an expected value from a comparison and cannot answer "equal" to
everything. Stdlib only, and only cheap modules (no json, re or collections: 10 ms less per check), since
`sandbox_child.py` imports it in a bare `python -I -S`.

Values that cross by value: None, bool, int, float, complex, str, bytes, bytearray, tuple, list, dict, set,
frozenset, range, collections.deque, fractions.Fraction, decimal.Decimal (exact types, nested freely).
Anything else the solution returns is a handle; anything else the tests pass is refused (TypeError).
The format is our own, read by a small pure-Python decoder that trusts nothing in the bytes.
"""

from __future__ import annotations

import _operator as operator  # not `operator`: 2 ms of a check's startup
import builtins
import os
import select
import struct
import sys
import time

MAX_MESSAGE = 64 << 20  # bytes; a bigger reply is a protocol error (the tests fail)
MAX_DEPTH = 200  # nesting of a decoded value

# Modules the tests' process imports itself when the solution's namespace names one (`import math` in the
# solution, `math.isclose` in the tests): side-effect free, so a solution cannot make the tests import
# anything else, and cannot make a module's functions lie. Any other module is a handle.
LOCAL_MODULES = frozenset({
    "math", "cmath", "itertools", "functools", "operator", "collections", "heapq", "bisect", "string",
    "re", "statistics", "fractions", "decimal", "numbers", "random", "copy", "typing", "dataclasses",
    "enum", "array", "textwrap", "unicodedata", "datetime", "json", "hashlib", "struct",
})

_BINARY = frozenset({"eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv", "floordiv", "mod",
                     "pow", "matmul", "and_", "or_", "xor", "lshift", "rshift", "contains"})
_UNARY = frozenset({"neg", "pos", "abs", "invert", "index", "len", "bool", "str", "repr", "hash", "iter",
                    "next", "int", "float"})


class Dead(BaseException):
    """The other process is gone or broke the protocol. A BaseException, so `except Exception` in a test
    cannot swallow it."""


class TimedOut(BaseException):
    """The solution did not answer within the test block's time."""


class Ref:
    """How a handle crosses: its number, and for a module its name, for an exception class its name and
    the builtin exception class it derives from."""

    __slots__ = ("hid", "module", "base", "name")

    def __init__(self, hid: int, module=None, base=None, name=None):
        self.hid, self.module, self.base, self.name = hid, module, base, name


# ------------------------------------------------------------------------------------------ framing

def send(fd: int, message, ref=None) -> None:
    send_raw(fd, frame(dumps(message, ref)))


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    chunks, left = [], size
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimedOut()
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise Dead("pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_bytes(fd: int, deadline: float | None = None) -> bytes:
    """One message, undecoded; `deadline` (monotonic) raises TimedOut, a closed pipe Dead."""
    (size,) = struct.unpack(">I", _read_exactly(fd, 4, deadline))
    if size > MAX_MESSAGE:
        raise Dead(f"message of {size} bytes")
    return _read_exactly(fd, size, deadline)


def recv(fd: int, deadline: float | None = None, handle=None):
    return loads(recv_bytes(fd, deadline), handle)


# ------------------------------------------------------------------------------------------ values

_U32, _F64 = struct.Struct(">I"), struct.Struct(">d")
_SEQUENCES = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z"}
_BYTES = {bytes: b"b", bytearray: b"B"}


def dumps(x, ref=None) -> bytes:
    """`x` as bytes: exact plain types by value, anything else as `ref(x)` (a Ref, or it raises)."""
    out: list[bytes] = []
    _dump(x, ref, out.append)
    return b"".join(out)


def _special(t, module: str, name: str) -> bool:
    return t is getattr(sys.modules.get(module), name, None)


def _dump(x, ref, put) -> None:
    t = type(x)
    if x is None:
        put(b"N")
    elif t is bool:
        put(b"T" if x else b"F")
    elif t is int:
        raw = x.to_bytes(x.bit_length() // 8 + 1, "big", signed=True)
        put(b"i" + _U32.pack(len(raw)) + raw)
    elif t is float:
        put(b"f" + _F64.pack(x))
    elif t is str:
        raw = x.encode("utf-8", "surrogatepass")
        put(b"s" + _U32.pack(len(raw)) + raw)
    elif t in _BYTES:
        put(_BYTES[t] + _U32.pack(len(x)) + bytes(x))
    elif t in _SEQUENCES or _special(t, "collections", "deque"):
        put(_SEQUENCES.get(t, b"q") + _U32.pack(len(x)))
        for item in list(x):
            _dump(item, ref, put)
    elif t is dict:
        put(b"d" + _U32.pack(len(x)))
        for key, value in list(x.items()):
            _dump(key, ref, put)
            _dump(value, ref, put)
    elif t is complex:
        put(b"c" + _F64.pack(x.real) + _F64.pack(x.imag))
    elif t is range:
        put(b"r")
        for part in (x.start, x.stop, x.step):
            _dump(part, ref, put)
    elif _special(t, "fractions", "Fraction"):
        put(b"Q")
        _dump(x.numerator, ref, put)
        _dump(x.denominator, ref, put)
    elif _special(t, "decimal", "Decimal"):
        put(b"D")
        _dump(str(x), ref, put)
    elif t is Ref:
        put(b"h")
        _dump((x.hid, x.module, x.base, x.name), None, put)
    elif ref is None:
        raise TypeError(f"a {t.__name__} cannot cross to the other process")
    else:
        _dump(ref(x), None, put)


def loads(data: bytes, handle=None):
    """The value `dumps` wrote; a Ref goes to `handle(ref)`. Malformed or trailing bytes raise Dead."""
    reader = _Reader(data, handle)
    try:
        value = reader.value(0)
    except (IndexError, struct.error, ValueError, TypeError, ArithmeticError, RecursionError) as err:
        raise Dead(f"malformed message: {type(err).__name__}") from None
    if reader.at != len(data):
        raise Dead("trailing bytes")
    return value


class _Reader:
    def __init__(self, data: bytes, handle):
        self.data, self.at, self.handle = data, 0, handle

    def take(self, size: int) -> bytes:
        if size > len(self.data) - self.at:
            raise ValueError("truncated")
        chunk = self.data[self.at:self.at + size]
        self.at += size
        return chunk

    def count(self) -> int:
        (n,) = _U32.unpack(self.take(4))
        if n > len(self.data) - self.at:  # every item takes a byte at least
            raise ValueError("count past the end")
        return n

    def value(self, depth: int):
        if depth > MAX_DEPTH:
            raise ValueError("nested too deep")
        tag = self.take(1)
        if tag == b"N":
            return None
        if tag in (b"T", b"F"):
            return tag == b"T"
        if tag == b"i":
            return int.from_bytes(self.take(self.count()), "big", signed=True)
        if tag == b"f":
            return _F64.unpack(self.take(8))[0]
        if tag == b"s":
            return self.take(self.count()).decode("utf-8", "surrogatepass")
        if tag in (b"b", b"B"):
            raw = self.take(self.count())
            return raw if tag == b"b" else bytearray(raw)
        if tag in (b"l", b"t", b"S", b"z", b"q"):
            items = [self.value(depth + 1) for _ in range(self.count())]
            if tag == b"q":
                import collections
                return collections.deque(items)
            return {b"l": list, b"t": tuple, b"S": set, b"z": frozenset}[tag](items)
        if tag == b"d":
            n = self.count()
            return dict((self.value(depth + 1), self.value(depth + 1)) for _ in range(n))
        if tag == b"c":
            return complex(_F64.unpack(self.take(8))[0], _F64.unpack(self.take(8))[0])
        if tag == b"r":
            return range(*(self.integer(depth) for _ in range(3)))
        if tag == b"Q":
            from fractions import Fraction
            return Fraction(self.integer(depth), self.integer(depth))
        if tag == b"D":
            from decimal import Decimal
            text = self.value(depth + 1)
            if type(text) is not str:
                raise ValueError("Decimal")
            return Decimal(text)
        if tag == b"h":
            return self.reference(depth)
        raise ValueError(f"unknown tag {tag!r}")

    def integer(self, depth: int) -> int:
        value = self.value(depth + 1)
        if type(value) is not int:
            raise ValueError("expected an int")
        return value

    def reference(self, depth: int):
        fields = self.value(depth + 1)
        if type(fields) is not tuple or len(fields) != 4 or type(fields[0]) is not int or self.handle is None:
            raise ValueError("bad handle")
        if not all(f is None or type(f) is str for f in fields[1:]):
            raise ValueError("bad handle")
        return self.handle(Ref(*fields))


# ------------------------------------------------------------------------------------------ solution side

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
                after = [a if type(a) in _MUTABLE else None for a in pos]
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


_MUTABLE = (list, dict, set, bytearray)


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def send_raw(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


# ------------------------------------------------------------------------------------------ tests side

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
                if new is not None and type(original) in _MUTABLE:
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
