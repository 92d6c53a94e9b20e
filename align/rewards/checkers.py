"""Verifiable checkers: plain functions from (completion, row, **args) to a score in [0, 1].

Checkers register by name with `@checker("name")`, so recipes and the evaluation hook pick them by name
and new ones plug in without an if/else chain. A checker never raises on malformed output: anything it
cannot parse scores 0.0, its lowest score. `needs` lists the row fields a checker requires, so a prompt
set without answers is refused at plan time rather than scored zero silently.

Recipes may pass per-checker arguments (`{checker: regex, args: {pattern: "^####"}}`); they reach the
function as keyword arguments. A checker declares the names it accepts in `params` and the ones that
must be given in `required`, so `Checker.args_problem` can refuse a misspelt or missing argument (or a
regex that does not compile) at plan time instead of every completion scoring 0.0 at run time.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

CheckFn = Callable[..., float]


@dataclass(frozen=True)
class Checker:
    name: str
    fn: CheckFn
    needs: tuple[str, ...]
    doc: str
    params: tuple[str, ...] = ()
    required: tuple[str, ...] = ()

    def __call__(self, completion: str, row: dict, **args: Any) -> float:
        try:
            score = float(self.fn(completion if isinstance(completion, str) else "", row, **args))
        except Exception:  # noqa: BLE001 - a checker's contract is "never raise"
            return 0.0
        return score if math.isfinite(score) else 0.0

    def args_problem(self, args: dict | None) -> str | None:
        """Why `args` cannot be passed to this checker, or None; checked at plan time so a typo fails loudly."""
        args = {} if args is None else args
        if not isinstance(args, dict):
            return f"checker {self.name!r}: args must be a mapping of name to value, got {type(args).__name__}"
        unknown = [name for name in args if name not in self.params]
        if unknown:
            accepted = ", ".join(self.params) if self.params else "none"
            return (f"checker {self.name!r} does not accept argument(s) {', '.join(map(repr, unknown))}; "
                    f"accepted: {accepted}")
        missing = [name for name in self.required if name not in args]
        if missing:
            return f"checker {self.name!r} needs argument(s) {', '.join(map(repr, missing))}"
        if "pattern" in self.params and "pattern" in args:
            try:
                re.compile(args["pattern"])
            except (re.error, TypeError) as err:
                return f"checker {self.name!r}: pattern {args['pattern']!r} does not compile: {err}"
        return None


CHECKERS: dict[str, Checker] = {}


def checker(name: str, needs: tuple[str, ...] = (), params: tuple[str, ...] = (), required: tuple[str, ...] = ()):
    """Register `fn` under `name`; `params` are the keyword args it accepts, `required` those it cannot go without."""
    if not set(required) <= set(params):
        raise ValueError(f"checker {name!r}: required args {sorted(set(required) - set(params))} are not in params")

    def register(fn: CheckFn) -> CheckFn:
        CHECKERS[name] = Checker(name=name, fn=fn, needs=tuple(needs), doc=(fn.__doc__ or "").strip(),
                                 params=tuple(params), required=tuple(required))
        return fn

    return register


def fields_needed(names) -> dict[str, tuple[str, ...]]:
    """For each known checker name, the row fields it reads (unknown names are reported elsewhere)."""
    return {name: CHECKERS[name].needs for name in names if name in CHECKERS}


def get_checker(name: str) -> Checker:
    if name not in CHECKERS:
        raise KeyError(f"unknown checker {name!r}; known: {', '.join(sorted(CHECKERS))}")
    return CHECKERS[name]


# ------------------------------------------------------------------------------------------ math

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def parse_number(text: str) -> float | None:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(text)
    except ValueError:
        frac = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", text)
        if frac and int(frac.group(2)) != 0:
            return int(frac.group(1)) / int(frac.group(2))
        return None


def extract_final_answer(text: str) -> str | None:
    """The model's final answer: after `####`, inside `\\boxed{}`, after 'answer is', else the last number."""
    if not isinstance(text, str):
        return None
    for pattern in (rf"####\s*({_NUMBER})", rf"\\boxed\{{\s*({_NUMBER})\s*\}}",
                    rf"[Aa]nswer(?:\s+is)?\s*[:=]?\s*({_NUMBER})"):
        found = re.findall(pattern, text)
        if found:
            return found[-1]
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def reference_answer(row: dict) -> float | None:
    answer = row.get("answer")
    if answer is None:
        return None
    if isinstance(answer, (int, float)):
        return float(answer)
    extracted = extract_final_answer(str(answer))
    return parse_number(extracted) if extracted is not None else None


@checker("math_answer", needs=("answer",), params=("tolerance",))
def math_answer(completion: str, row: dict, tolerance: float = 1e-6) -> float:
    """1.0 when the final number in the completion equals the row's `answer` (relative `tolerance`, 1e-6)."""
    expected = reference_answer(row)
    found = extract_final_answer(completion)
    if expected is None or found is None:
        return 0.0
    value = parse_number(found)
    if value is None:
        return 0.0
    return 1.0 if math.isclose(value, expected, rel_tol=float(tolerance), abs_tol=1e-9) else 0.0


@checker("answer_format")
def answer_format(completion: str, row: dict) -> float:
    """1.0 when the completion states a final answer as `#### <number>`."""
    return 1.0 if re.search(rf"####\s*{_NUMBER}", completion) else 0.0


@checker("exact_match", needs=("answer",))
def exact_match(completion: str, row: dict) -> float:
    """1.0 when the stripped completion equals the row's `answer` exactly."""
    return 1.0 if completion.strip() == str(row["answer"]).strip() else 0.0


# ------------------------------------------------------------------------------------------ format

@checker("regex", params=("pattern", "full"), required=("pattern",))
def regex(completion: str, row: dict, pattern: str, full: bool = False) -> float:
    """1.0 when `pattern` occurs in the completion (`full: true`: matches the whole stripped completion)."""
    if full:
        return 1.0 if re.fullmatch(pattern, completion.strip()) else 0.0
    return 1.0 if re.search(pattern, completion) else 0.0


# A fenced block: its language tag and its body. An unclosed last fence (a truncated generation) still counts.
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def fenced_blocks(text: str, languages: tuple[str, ...]) -> list[str]:
    """Bodies of the ``` fenced blocks whose language tag (lower-cased, "" for none) is in `languages`."""
    return [body for lang, body in _FENCE.findall(text) if lang.lower() in languages]


@checker("json_valid", params=("required_keys",))
def json_valid(completion: str, row: dict, required_keys: list[str] | None = None) -> float:
    """1.0 when the completion (or its last ```json block) is JSON; `required_keys` must be top-level keys."""
    candidates = [completion.strip()] + [body.strip() for body in reversed(fenced_blocks(completion, ("json", "")))]
    for text in candidates:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if not required_keys:
            return 1.0
        keys = [required_keys] if isinstance(required_keys, str) else list(required_keys)
        return 1.0 if isinstance(value, dict) and all(key in value for key in keys) else 0.0
    return 0.0


# ------------------------------------------------------------------------------------------ code

# Runs before the completion's code: Python-level containment through an audit hook (PEP 578), which
# cannot be removed once installed. It refuses
# - writes outside the sandbox folder: `open`/`os.open` for writing, and removing, renaming, linking,
#   chmod/chown/truncate/utime of paths that resolve outside it (reads are allowed: the stdlib must import);
# - new processes: `os.fork`, `os.forkpty`, `os.system`, `os.exec*`, `os.posix_spawn`, `os.spawn*`,
#   `subprocess.Popen`, and `_posixsubprocess.fork_exec` (replaced before the code runs); signals to other
#   processes (`os.kill`, `os.killpg`);
# - native code: `ctypes` cannot load a library, and a fresh import of `_posixsubprocess` is refused;
# - the network: `socket.socket` becomes a subclass that refuses to construct (a subclass, not a function,
#   so that modules subclassing it at import time, such as `ssl`, still import), and connects are refused.
# What it does NOT contain: C extension modules already installed that make system calls of their own
# (e.g. `sqlite3.connect` creating a file, `mmap`, `_socket` used directly before `socket` is patched).
# The OS-level limits around it (`_limit_resources`) hold regardless: address space, CPU seconds, no core
# files, RLIMIT_NPROC (which Linux does not enforce for root), a fresh session whose whole process group is
# killed at the end, cwd/HOME/TMPDIR in a throwaway folder. This is a guard against accidents and careless
# completions, NOT a security boundary against hostile code: run that in a container or VM.
_GUARD = """\
import os as _os, sys as _sys

def _align_guard(sandbox):
    import socket

    sandbox = _os.path.realpath(sandbox)
    write_flags = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND
    inside = lambda path: _os.path.realpath(_os.fsdecode(path)).startswith(sandbox + _os.sep)
    mutating = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
                "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1,
                "os.mkfifo": 1, "os.mknod": 1}
    processes = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                 "subprocess.Popen", "ctypes.dlopen", "socket.connect", "socket.bind"}

    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                      else bool((flags or 0) & write_flags))
            if writes and not isinstance(path, int) and not inside(path):
                refuse(f"writing {path!r} outside the sandbox folder")
        elif event in mutating:
            for path in args[: mutating[event]]:
                if isinstance(path, (str, bytes, _os.PathLike)) and not inside(path):
                    refuse(f"{event} on {path!r} outside the sandbox folder")
        elif event in processes:
            refuse(event)
        elif event in ("os.kill", "os.killpg") and args[0] != _os.getpid():
            refuse(event)
        elif event == "import" and args[0] in ("_posixsubprocess", "_ctypes"):
            refuse(f"importing {args[0]}")

    def no_network(*args, **kwargs):
        raise OSError("network disabled")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise OSError("network disabled")

    socket.socket = NoSocket
    socket.create_connection = no_network
    socket.getaddrinfo = no_network
    import _posixsubprocess
    _posixsubprocess.fork_exec = lambda *args, **kwargs: refuse("starting a process")
    _sys.dont_write_bytecode = True
    _sys.addaudithook(hook)


_align_guard(__SANDBOX__)
del _align_guard
"""

# The file the child runs: the guard, then solution + tests run as `__main__` from their own file (so a
# `from __future__` import at the top of the solution stays legal), then a marker written only when that
# file ran to its end. The marker makes an early `sys.exit(0)` or `os._exit(0)` in the solution, which skips
# the tests, score 0.0 rather than pass.
_RUNNER = """\
{guard}
import runpy

runpy.run_path({program!r}, run_name="__main__")
with open({marker!r}, "w") as done:
    done.write("ok")
"""

# Processes the child may have at once, on top of those its user already runs (RLIMIT_NPROC counts them all).
_EXTRA_PROCESSES = 16


def extract_code(completion: str) -> str:
    """The last ```python (or untagged ```) block of the completion, else the whole completion."""
    blocks = fenced_blocks(completion, ("python", "python3", "py", ""))
    return blocks[-1] if blocks else completion


def _limit_resources(memory_mb: float, cpu_seconds: int) -> Callable[[], None]:
    """The child's rlimits, set between fork and exec (so they bind the program, never this process)."""
    memory = int(memory_mb * 1024 * 1024)

    def cap(kind: int, value: int) -> None:
        _, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))

    processes = _user_process_count() + _EXTRA_PROCESSES

    def apply() -> None:
        cap(resource.RLIMIT_NPROC, processes)  # no fork bomb (not enforced for root: the guard refuses forks)
        cap(resource.RLIMIT_AS, memory)
        cap(resource.RLIMIT_CPU, cpu_seconds)  # a busy loop dies even if the wall-clock kill were missed
        cap(resource.RLIMIT_CORE, 0)  # no core files from a killed program

    return apply


def _user_process_count() -> int:
    """How many processes (threads count too, as RLIMIT_NPROC counts them) this user runs now."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


def _kill_group(pid: int) -> None:
    """SIGKILL the child's whole process group, so that anything it forked goes with it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(source: str, timeout: float = 5.0, memory_mb: float = 512) -> bool:
    """Whether `source` runs to its end and exits 0 in a fresh interpreter within the time and memory limits,
    in a throwaway folder it may not write outside of, without network or child processes (see `_GUARD`)."""
    with tempfile.TemporaryDirectory(prefix="align-check-") as tmp:
        program, runner = os.path.join(tmp, "solution.py"), os.path.join(tmp, "main.py")
        marker = os.path.join(tmp, f"done-{secrets.token_hex(8)}")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        with open(runner, "w", encoding="utf-8") as f:
            f.write(_RUNNER.format(guard=_GUARD.replace("__SANDBOX__", repr(tmp)), program=program, marker=marker))
        env = {"HOME": tmp, "TMPDIR": tmp, "PATH": os.defpath, "LANG": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", "-B", runner], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_limit_resources(memory_mb, math.ceil(timeout) + 1))
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _kill_group(proc.pid)  # also after a clean exit: a forked child must not outlive the check
            proc.wait()
        return code == 0 and os.path.exists(marker)


@checker("python_tests", needs=("tests",), params=("timeout", "memory_mb", "partial"))
def python_tests(completion: str, row: dict, timeout: float = 5.0, memory_mb: float = 512,
                 partial: bool = False) -> float:
    """1.0 when the completion's code passes the row's `tests` (asserts) in a subprocess with time and
    memory limits; `partial: true` with a list of tests scores the share that passes, each run on its own."""
    tests = row["tests"]
    if isinstance(tests, str):
        tests = [tests]
    tests = [t for t in tests if isinstance(t, str) and t.strip()]
    if not tests:  # nothing to verify: passing vacuously would reward any output
        return 0.0
    code = extract_code(completion)
    if partial:
        return sum(run_python(code + "\n\n" + t, timeout, memory_mb) for t in tests) / len(tests)
    return 1.0 if run_python(code + "\n\n" + "\n\n".join(tests), timeout, memory_mb) else 0.0
