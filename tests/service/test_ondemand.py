"""OnDemand: items made when first read, once; a list's reads otherwise."""

from __future__ import annotations

import pytest

from logitwatch.service.store.ondemand import OnDemand


def test_items_are_made_once_and_only_where_read():
    made = []

    def make(i):
        made.append(i)
        return i * 10

    xs = OnDemand(5, make)
    assert len(xs) == 5 and made == []
    assert xs[3] == 30 and xs[-1] == 40 and xs[3] == 30
    assert made == [3, 4]  # made once each, nothing else
    assert list(xs) == [0, 10, 20, 30, 40] and xs[1:3] == [10, 20]
    assert sorted(made) == [0, 1, 2, 3, 4]  # iterating made the rest, once
    assert xs == [0, 10, 20, 30, 40] and xs != [0]
    with pytest.raises(IndexError):
        OnDemand(2, make)[2]
