"""Exact-name registries (as lm-evaluation-harness does): no substring dispatch.

A registry refuses a duplicate name and, asked for an unknown one, fails with the list of
valid names.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from benchmarks.core.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps exact names to objects of one kind (defenses, attacks, retain losses, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("npo")``. A name can be registered once."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
