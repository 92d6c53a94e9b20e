"""Named registries of objective variants, and the recipe check that a name is in one.

Why: a variant (a DPO-family loss, an advantage estimator, a KL estimator) used to be chosen by if/elif
chains, its name repeated in the recipe schema, the loss function and every place that asked what it needs.
Now each variant is one registered function with its properties; the schema, the stages and the trainer ask
its registry. Adding a variant is one decorated function; the registry's error names the known ones.
"""

from __future__ import annotations

import importlib
from typing import Any, Generic, Iterator, TypeVar

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

T = TypeVar("T")


def one_of(names: list[str]) -> str:
    """`'a', 'b' or 'c'`: how pydantic lists a Literal's values, so a registered name reads the same."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


class Registry(Generic[T]):
    """Variants of one kind of objective by name, in the order they were registered."""

    def __init__(self, kind: str):
        self.kind = kind  # what an error calls one of them: "DPO loss", "advantage estimator"
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str, wrap=None):
        """Decorator: add the decorated function under `name`, or what `wrap(function)` makes of it (the
        variant with its properties); the function itself is returned, so it stays callable as written."""

        def decorate(function):
            self.add(name, wrap(function) if wrap is not None else function)
            return function

        return decorate

    def remove(self, name: str) -> None:
        """Forget `name` (a test's own variant, once the test is done)."""
        del self._entries[name]

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {one_of(self.names())}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())


def resolve(where: str) -> Registry:
    """The registry at `where` ("package.module.NAME"), its module imported on first use."""
    module, _, name = where.rpartition(".")
    return getattr(importlib.import_module(module), name)


def registered_name(where: str) -> BeforeValidator:
    """A recipe field's check that its value names an entry of the registry at `where`. The registry is looked
    up when a recipe is validated, not when the schema is imported (its module imports torch), so variants
    registered later (a plugin, a test) are accepted. A wrong value fails as a `Literal` field would (error
    type `literal_error`, listing the known names), so the recipe's messages keep their form."""

    def check(value: Any) -> Any:
        registry = resolve(where)
        if value in registry:
            return value
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": one_of(registry.names())})

    return BeforeValidator(check)
