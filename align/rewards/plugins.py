"""User code a recipe names where it names a built-in: checkers, batch reward functions and eval metrics.

A plugin is a spec string, `package.module:function` (imported like any Python import) or
`path/to/file.py:function` (a file, found the way the recipe's data paths are: `Recipe.resolve_path`).
Every kind of plugin loads through `load_callable`, which imports each module once (a file again only
when its content changed) and keeps the content hash of the file the code came from, so a manifest can
say exactly what scored a run.

Plugins run in the trainer's own process, with its permissions: they are the user's own trusted code,
like the recipe itself. (The policy's completions are not: `python_tests` runs those in a sandbox.)

Built-in checkers never raise; user code may. Its errors and unusable results are reported as a
`PluginError` naming the plugin, the row and the line in the user's file, not as a bare traceback from
inside align.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from align.errors import AlignError
from align.registry.fingerprint import hash_file

PathResolver = Callable[[str], Path]
ALIGN_FOLDER = str(Path(__file__).resolve().parents[1]) + os.sep  # frames in align's code are not the user's


class PluginError(AlignError):
    """User code named in a recipe cannot be loaded, cannot take what align passes, or failed while scoring."""


@dataclass(frozen=True)
class Plugin:
    """A loaded plugin: the spec as the recipe wrote it, the callable, and the file it came from with its hash."""

    spec: str
    fn: Callable
    file: str | None
    file_hash: str | None

    @property
    def label(self) -> str:
        return spec_label(self.spec)

    def record(self) -> dict:
        """What a manifest keeps of it: lineage names the code that scored a run."""
        return {"spec": self.spec, "file": self.file, "hash": self.file_hash}


def is_plugin_spec(name: Any) -> bool:
    """Whether a checker or metric name points at user code (`module:function`); built-in names have no colon."""
    return isinstance(name, str) and ":" in name


def spec_label(name: str) -> str:
    """A plugin's figure name, its function's own name (`pkg.mod:is_polite` -> `is_polite`, so figures read
    `reward/is_polite`, `is_polite_pass_rate`); a built-in name as it is."""
    return name.rpartition(":")[2].rpartition(".")[2] if is_plugin_spec(name) else name


def split_spec(spec: str, kind: str = "plugin") -> tuple[str, str]:
    """(module or file, attribute path) of `spec`; a `PluginError` when either part is missing."""
    target, _, attribute = spec.rpartition(":")
    if not target.strip() or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", attribute.strip()):
        raise PluginError(f"{kind} {spec!r}: expected `package.module:function` or `path/to/file.py:function`")
    return target.strip(), attribute.strip()


def is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def load_callable(spec: str, resolve_path: PathResolver | None = None, kind: str = "plugin") -> Plugin:
    """The callable `spec` names, imported once. `resolve_path` finds a relative file (a recipe's
    `resolve_path`; default: from the working directory). Raises `PluginError` saying what is wrong:
    the module or file is missing or fails to import, it has no such name, or the name is not callable."""
    target, attribute = split_spec(spec, kind)
    if is_file_target(target):
        path = Path(resolve_path(target)) if resolve_path is not None else Path(target).expanduser()
        if not path.is_file():
            raise PluginError(f"{kind} {spec!r}: file {target} not found (a relative path is taken from the "
                              "working directory, else from the recipe's folder)")
        file, file_hash, where = str(path.resolve()), hash_file(path), f"file {target}"
        try:
            module = _import_file(file, file_hash)
        except Exception as err:  # noqa: BLE001 - anything the user's file raises is reported as theirs
            raise PluginError(f"{kind} {spec!r}: importing {target} failed: {_describe(err)}") from err
    else:
        where = f"module {target}"
        try:
            module, file, file_hash = _import_module(target)
        except ModuleNotFoundError as err:
            if err.name and (target == err.name or target.startswith(err.name + ".")):
                raise PluginError(f"{kind} {spec!r}: module {target!r} not found (it is imported like any "
                                  "Python module: install it, or put its folder on PYTHONPATH)") from err
            raise PluginError(f"{kind} {spec!r}: importing module {target!r} failed: {_describe(err)}") from err
        except Exception as err:  # noqa: BLE001 - anything the user's module raises is reported as theirs
            raise PluginError(f"{kind} {spec!r}: importing module {target!r} failed: {_describe(err)}") from err
    value = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise PluginError(f"{kind} {spec!r}: no function {attribute!r} in {where}{_names_hint(module, part)}")
        value = getattr(value, part)
    if not callable(value):
        raise PluginError(f"{kind} {spec!r}: {attribute!r} in {where} is not callable (it is "
                          f"{_article(type(value).__name__)})")
    return Plugin(spec=spec, fn=value, file=file, file_hash=file_hash)


@functools.lru_cache(maxsize=None)
def _import_file(path: str, content_hash: str):
    """The module of a plugin file, imported once per content (an edited file is imported afresh)."""
    stem = re.sub(r"\W", "_", Path(path).stem)
    name = f"align_plugin_{stem}_{content_hash[:8]}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"{path} cannot be imported as Python")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # before running it, as an import does: dataclasses and pickling look it up
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


@functools.lru_cache(maxsize=None)
def _import_module(target: str):
    """(module, its file, that file's hash) of an importable module, imported once."""
    module = importlib.import_module(target)
    file = getattr(module, "__file__", None)
    return module, file, hash_file(file) if file and Path(file).is_file() else None


def call_problem(fn: Callable, *args: Any, **kwargs: Any) -> str | None:
    """Why `fn` cannot be called with these arguments (judged by its signature, nothing is run), or None."""
    return _bind_problem(fn, args, kwargs, partial=False)


def shape_problem(fn: Callable, *args: Any, **kwargs: Any) -> str | None:
    """Like `call_problem`, but a missing argument is not a problem (the recipe's `args` may give it)."""
    return _bind_problem(fn, args, kwargs, partial=True)


def _bind_problem(fn: Callable, args: tuple, kwargs: dict, partial: bool) -> str | None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some builtins): trusted as given
        return None
    try:
        (signature.bind_partial if partial else signature.bind)(*args, **kwargs)
    except TypeError as err:
        return f"{_name(fn)}{signature}: {err}"
    return None


def arguments_problem(fn: Callable, args: dict, positional: int = 0, passed: tuple[str, ...] = ()) -> str | None:
    """Why the recipe's `args` cannot go to `fn` after what align passes itself (`positional` leading
    positional arguments, the keywords `passed`): names it does not take and names it needs, or None."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins): trusted as given
        return None
    by_position = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    taken = {p.name for p in parameters[:positional] if p.kind in by_position} if positional else set()
    named = [p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       inspect.Parameter.KEYWORD_ONLY)
             and p.name not in taken and p.name not in passed]
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    unknown = [a for a in args if a in passed or a in taken or (a not in named and not any_keyword)]
    missing = [p.name for p in parameters if p.name in named and p.default is inspect.Parameter.empty
               and p.name not in args]
    why = []
    if unknown:
        accepted = ", ".join(named) + (", **kwargs" if any_keyword else "") if named or any_keyword else "none"
        why.append(f"unexpected argument(s) {', '.join(map(repr, unknown))} (accepted: {accepted})")
    if missing:
        why.append(f"needs argument(s) {', '.join(map(repr, missing))}")
    return "; ".join(why) or None


def failed(plugin: Plugin, kind: str, err: Exception, what: str) -> PluginError:
    """The error for user code that raised while working on `what` (`prompt row 3`)."""
    return PluginError(f"{kind} {plugin.spec!r} raised {_describe(err, plugin.file)} {what}")


def as_number(plugin: Plugin, kind: str, value: Any, what: str) -> float:
    """`value` as a float, or a `PluginError` naming the plugin and `what` when it is not a finite number."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a numpy or torch scalar
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise PluginError(f"{kind} {plugin.spec!r} returned {_short(value)} {what}; it must return a number")
    number = float(value)
    if not math.isfinite(number):
        raise PluginError(f"{kind} {plugin.spec!r} returned {number} {what}; it must return a finite number")
    return number


def row_number(row: Any, index: int) -> int:
    """A prompt row's number in its file (`row`, set when prompts load), else `index`, its place in the list
    scored (the eval prompts are scored in file order)."""
    number = row.get("row") if isinstance(row, dict) else None
    return number if isinstance(number, int) else index


def row_label(row: Any, index: int) -> str:
    """How an error names a prompt row: `prompt row 12`."""
    return f"prompt row {row_number(row, index)}"


def _describe(err: BaseException, own_file: str | None = None) -> str:
    """`ValueError: message (at my_checks.py:12)`: the error and the last line it passed in `own_file` (the
    plugin's file), else in any code outside align."""
    place = ""
    if isinstance(err, SyntaxError) and err.filename:
        place = f" (at {Path(err.filename).name}:{err.lineno})"
    else:
        frames = [f for f in traceback.extract_tb(err.__traceback__)
                  if not f.filename.startswith((ALIGN_FOLDER, "<frozen"))]
        own = [f for f in frames if own_file and Path(f.filename).resolve() == Path(own_file).resolve()]
        frames = own or frames
        if frames:
            place = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})"
    message = str(err)
    return f"{type(err).__name__}: {message}{place}" if message else f"{type(err).__name__}{place}"


def _names_hint(module, missing: str) -> str:
    """` (did you mean 'x'?)`, or the functions the module defines, for a name it lacks."""
    names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
             and getattr(v, "__module__", None) == module.__name__]
    close = difflib.get_close_matches(missing, names, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (it defines: {', '.join(sorted(names)[:10])})" if names else ""


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def plugin_hashes(specs, resolve_path: PathResolver | None = None) -> dict[str, str | None]:
    """{spec: content hash of its file} for the plugin specs among `specs` (built-in names are skipped): part
    of a run's fingerprint, so a run folder trained with one version of the user's code does not resume
    with another. A spec that does not load is left to the plan's and the stage's own checks."""
    hashes = {}
    for spec in specs:
        if is_plugin_spec(spec) and spec not in hashes:
            try:
                hashes[spec] = load_callable(spec, resolve_path).file_hash
            except AlignError:
                hashes[spec] = None
    return hashes
