"""The wire between the two processes of a `python_tests` check: framing and the value format.

Values that cross by value: None, bool, int, float, complex, str, bytes, bytearray, tuple, list, dict, set,
frozenset, range, collections.deque, fractions.Fraction, decimal.Decimal (exact types, nested freely).
Anything else crosses as a `Ref` (a handle) or is refused (TypeError). The format is our own, read by a
small pure-Python decoder that trusts nothing in the bytes. Stdlib only, and only cheap modules (no json,
re or collections: 10 ms less per check), since the child imports it in a bare `python -I -S`. Both sides
use it: the solution's (`sandbox_rpc`) and the tests' (`sandbox_remote`).
"""

from __future__ import annotations

import os
import select
import struct
import sys
import time

MAX_MESSAGE = 64 << 20  # bytes; a bigger reply is a protocol error (the tests fail)

MAX_DEPTH = 200  # nesting of a decoded value

# What a call may change in place: the solution sends these arguments back, the tests update theirs.
MUTABLE = (list, dict, set, bytearray)


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


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def send_raw(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


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
