"""The collector settings the service runs under, and that they are undone on shutdown."""

from __future__ import annotations

import gc

from logitwatch.service.app import GC_YOUNG, server_gc


def test_server_gc_freezes_start_up_and_batches_young_collections_then_restores():
    before = gc.get_threshold()
    with server_gc():
        assert gc.get_threshold() == (GC_YOUNG, *before[1:])
        assert gc.get_freeze_count() > 0  # start-up objects are out of every collection
        garbage = []
        garbage.append(garbage)  # a cycle made while serving is still collected
        del garbage
        assert gc.collect() >= 1
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
