"""Name -> factory registries whose unknown-name errors list the closest valid names."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from segdeploy.errors import UnknownNameError

T = TypeVar("T")


def did_you_mean(name: str, options: Iterable[str], n: int = 3) -> str:
    """' (did you mean x, y?)' for the closest options, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(options), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


class Registry(Generic[T]):
    """Name -> object (builders, losses) of one `kind`; names are lower case, an unknown one is an UnknownNameError
    listing the closest."""
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name` (see `add`)."""
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Register `obj` under `name`; ValueError when the name is taken."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = obj

    def get(self, name: str, where: str = "") -> T:
        """The object registered as `name` (any case); UnknownNameError naming `where` (a recipe key), the closest
        names and all valid ones."""
        key = name.lower()
        if key not in self._items:
            loc = f" in {where}" if where else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{loc}{did_you_mean(key, self._items)}; "
                f"valid: {', '.join(sorted(self._items))}"
            )
        return self._items[key]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items
