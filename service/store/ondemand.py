"""OnDemand: a read-only list whose items are made when first read."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["OnDemand"]


class OnDemand(Sequence):
    """A read-only list whose item i is ``make(i)``, made when first read and then kept;
    iterating it makes (and keeps) every item. A report decoded by its run's layout
    (api/layouts.py) hands its ~200 Series and Columns over like this: the store and the
    rules read its three arrays end to end, and only the few series the rules look at one by
    one are ever made (each costs about as much as the rest of its series' ingest).

    >>> squares = OnDemand(4, lambda i: i * i)
    >>> squares[3], len(squares), list(squares)
    (9, 4, [0, 1, 4, 9])
    """

    __slots__ = ("_all", "_items", "_make", "_n")

    def __init__(self, n: int, make: Callable[[int], Any]) -> None:
        self._n, self._make = n, make
        self._items: dict[int, Any] = {}
        self._all: list | None = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if self._all is not None:
            return self._all[i]
        if isinstance(i, slice):
            return self.list()[i]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("OnDemand index out of range")
        got = self._items.get(i, _MISSING)
        if got is _MISSING:
            got = self._items[i] = self._make(i)
        return got

    def __iter__(self) -> Iterator:
        return iter(self.list())

    def list(self) -> list:
        """Every item, in order (made once)."""
        if self._all is None:
            items, make = self._items, self._make
            self._all = [items[i] if i in items else make(i) for i in range(self._n)]
        return self._all

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OnDemand | list | tuple):
            return self.list() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a list's

    def __repr__(self) -> str:
        return f"OnDemand({self.list()!r})"


_MISSING = object()
