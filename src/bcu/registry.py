"""A tiny name -> factory registry shared by models, attacks and defenses (timm-style)."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterator, List, Optional, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names to objects (classes or factory functions).

    >>> R = Registry("widget")
    >>> @R.register("foo")
    ... def make_foo(): return 1
    >>> R.get("FOO")()
    1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._help: Dict[str, str] = {}

    def register(self, name: Optional[str] = None, help: str = "") -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = (name or getattr(obj, "name", None) or getattr(obj, "__name__")).lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            if isinstance(obj, type) and "name" not in vars(obj):
                obj.name = key  # classes learn the name they are registered under
            doc = help or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._help[key] = doc
            return obj

        return deco

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            close = difflib.get_close_matches(key, self._items.keys(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._items))})"
            )
        return self._items[key]

    def names(self) -> List[str]:
        return sorted(self._items)

    def help(self, name: str) -> str:
        return self._help.get(name.lower(), "")

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
