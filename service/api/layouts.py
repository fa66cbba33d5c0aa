"""Decoding a run's one-step report by its byte layout, learned from the run's last one.

A training run posts the same report every step: the same series, in the same order, with one
step, one value and one time each. Its msgpack bytes differ from the previous report's only in
the batch's seq and in each series' 8-byte step, value and time. decode_batch checks every
series' names and builds its arrays again (most of a request's decoding); here a report whose
other bytes equal those of the run's last accepted one-step report (its layout) is read
straight from those slots into the columns prepare_batch would make.

Same answers: a body matching a layout has the structure, names and fields of one that
decode_batch accepted, byte for byte, so only the slots can differ; the seq slot must hold an
unsigned integer of the same width and each step must be in range, or the body takes the full
path (and gets its error there). The Batch and Prepared are those that decode_batch and
prepare_batch return for it, byte for byte (tests/service/test_layouts.py); a Series' steps,
values and times are numpy row views here rather than array.array (same bytes, length and
items).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import msgpack
import numpy as np

from logitwatch.protocol import MAX_STEP, MSGPACK_CONTENT_TYPE, Batch, Series
from logitwatch.service.store import Prepared
from logitwatch.service.store.ingest import Columns, Shape
from logitwatch.service.store.ondemand import OnDemand

__all__ = ["Layouts"]

_MSGPACK = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
_LITTLE = sys.byteorder == "little"
_EIGHT = np.arange(8, dtype=np.intp)
_EMPTY_F = np.empty(0, dtype=np.float64)
#: Unsigned integer encodings (type byte -> total length) a seq slot may hold.
_UINTS = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}


class _Unsupported(Exception):
    """A body whose layout is not learned (an ext type, or a shape not worth it)."""


@dataclass(slots=True, frozen=True)
class _Layout:
    body: np.ndarray  # the learned body with its slots zeroed
    mask: np.ndarray  # 0 over the slots, 0xFF elsewhere
    seq_at: int
    seq_len: int
    steps_at: np.ndarray  # where each series' step starts (int32)
    values_at: np.ndarray
    times_at: np.ndarray | None  # None: the report has no times
    client: str
    segment: int
    metrics: list[str]  # each series' metric
    labels: list[dict[str, str]]  # each series' labels (copied for each batch)
    keys: list[str]  # each series' labels_key (Prepared.keys)
    shape: Shape  # (metric, labels_key) of each series (Prepared.shape)


class Layouts:
    """The layout of each run's last one-step report (at most `max_runs` runs).

    >>> layouts = Layouts()  # doctest: +SKIP
    >>> batch, prepared = layouts.decode(run, body, content_type, postgres, full_decode)  # doctest: +SKIP
    """

    def __init__(self, max_runs: int = 4096) -> None:
        self._by_run: dict[str, _Layout] = {}
        #: Reports of each run that missed its layout in a row.
        self._misses: dict[str, int] = {}
        self._max_runs = max_runs

    def decode(self, run: str, body: bytes, content_type: str | None, postgres: bool, full):
        """(Batch, Prepared) of `body`: from the run's layout when it matches, else from
        ``full(body, content_type, postgres)``, whose one-step reports teach the layout."""
        ct = (content_type or MSGPACK_CONTENT_TYPE).split(";")[0].strip().lower()
        if ct not in _MSGPACK or not _LITTLE:
            return full(body, content_type, postgres)
        layout = self._by_run.get(run)
        if layout is not None:
            hit = _read(layout, body, postgres)
            if hit is not None:
                self._misses.pop(run, None)
                return hit
        batch, prepared = full(body, content_type, postgres)
        if prepared.points is not None and self._learns(run, layout is None):
            try:
                learned = _learn(body, batch, prepared)
            except (_Unsupported, IndexError, ValueError, msgpack.UnpackException):
                learned = None
            if learned is not None:
                if len(self._by_run) >= self._max_runs and run not in self._by_run:
                    self._by_run.clear()
                    self._misses.clear()
                self._by_run[run] = learned
        return batch, prepared

    def _learns(self, run: str, first: bool) -> bool:
        """Whether to learn a run's layout from its report that missed (learning costs a few
        decodes): its first one, else the 2nd, 4th, 8th, ... miss in a row. A report of
        another shape now and then keeps the layout; one that changed for good (a wider
        seq, another set of series) is learned from its second report."""
        if first:
            return True
        n = self._misses[run] = self._misses.get(run, 0) + 1
        return n >= 2 and n & (n - 1) == 0


def _read(layout: _Layout, body: bytes, postgres: bool) -> tuple[Batch, Prepared] | None:
    """The batch and its Prepared if `body` matches `layout`, else None."""
    if len(body) != len(layout.body):
        return None
    buf = np.frombuffer(body, dtype=np.uint8)
    if not np.array_equal(buf & layout.mask, layout.body):
        return None
    seq = _uint(body, layout.seq_at, layout.seq_len)
    if seq is None or seq > MAX_STEP:
        return None
    steps = buf[layout.steps_at[:, None] + _EIGHT].view(np.int64).reshape(-1)
    if len(steps) and (steps.min() < 0 or steps.max() > MAX_STEP):
        return None
    values = buf[layout.values_at[:, None] + _EIGHT].view(np.float64).reshape(-1)
    if layout.times_at is not None:
        times = buf[layout.times_at[:, None] + _EIGHT].view(np.float64).reshape(-1)
    else:
        times = _EMPTY_F
    # The Series and Columns of each series are made only where something reads them (the
    # store and the rules read the three arrays end to end, and a rule's slow path a few
    # series): making all 200 of a report was a sixth of its cost, measured.
    n = len(steps)
    series = OnDemand(n, _Maker(layout, steps, values, times, True))
    batch = Batch(layout.client, seq, layout.segment, series)  # type: ignore[arg-type]
    columns = OnDemand(n, _Maker(layout, steps, values, times, False))
    points = Columns(steps, values, times)
    keys = list(layout.keys)
    prepared = Prepared(postgres, [], columns, keys, points, layout.shape)  # type: ignore[arg-type]
    return batch, prepared


class _Maker:
    """Series i (or its Columns) of a report read by its layout: one-item views of the
    report's arrays (same bytes, length and items as decode_batch's array.array)."""

    __slots__ = ("layout", "series", "steps", "times", "values")

    def __init__(self, layout: _Layout, steps, values, times, series: bool) -> None:
        self.layout, self.steps, self.values, self.times = layout, steps, values, times
        self.series = series

    def __call__(self, i: int) -> Series | Columns:
        at = slice(i, i + 1)
        times = self.times[at] if len(self.times) else _EMPTY_F
        if self.series:
            lay = self.layout
            return Series._of_arrays(
                lay.metrics[i], dict(lay.labels[i]), self.steps[at], self.values[at], times
            )
        return Columns(self.steps[at], self.values[at], times)


def _uint(body: bytes, at: int, length: int) -> int | None:
    """The unsigned integer msgpack encodes in body[at : at + length], if that is one."""
    tag = body[at]
    if length == 1:
        return tag if tag < 0x80 else None
    if _UINTS.get(tag) != length:
        return None
    return int.from_bytes(body[at + 1 : at + length], "big")


# -- learning a layout: where a body's seq and its series' steps, values and times lie ------


def _learn(body: bytes, batch: Batch, prepared: Prepared) -> _Layout | None:
    """The layout of `body`, a one-step report that decode_batch accepted as `batch`."""
    seq_slot, slots = _slots(body)
    n = len(batch.series)
    if seq_slot is None or len(slots) != n:
        return None
    steps_at, values_at, times_at = [], [], []
    for found in slots:
        if found.get("steps", (0, 0))[1] != 8 or found.get("values", (0, 0))[1] != 8:
            return None
        steps_at.append(found["steps"][0])
        values_at.append(found["values"][0])
        times_at.append(found.get("times", (0, 0)))
    timed = {length for _, length in times_at}
    if timed not in ({0}, {8}):
        return None
    mask = np.full(len(body), 0xFF, dtype=np.uint8)
    at = {
        "steps": np.asarray(steps_at, dtype=np.int32),
        "values": np.asarray(values_at, dtype=np.int32),
        "times": np.asarray([a for a, _ in times_at], dtype=np.int32) if timed == {8} else None,
    }
    for starts in at.values():
        if starts is not None:
            mask[starts[:, None] + _EIGHT] = 0
    mask[seq_slot[0] : seq_slot[0] + seq_slot[1]] = 0
    buf = np.frombuffer(body, dtype=np.uint8)
    layout = _Layout(
        body=buf & mask,
        mask=mask,
        seq_at=seq_slot[0],
        seq_len=seq_slot[1],
        steps_at=at["steps"],
        values_at=at["values"],
        times_at=at["times"],
        client=batch.client,
        segment=batch.segment,
        metrics=[s.metric for s in batch.series],
        labels=[_interned(s.labels) for s in batch.series],
        keys=list(prepared.keys),
        shape=Shape(tuple(zip([s.metric for s in batch.series], prepared.keys, strict=True))),
    )
    # The layout must read the body it was learned from as decode_batch did.
    got = _read(layout, body, prepared.postgres)
    if got is None or not _same(got, batch, prepared):
        return None
    return layout


#: One dict per label set for all layouts (never changed: each batch gets copies).
_LABELS: dict[tuple, dict[str, str]] = {}


def _interned(labels: dict[str, str]) -> dict[str, str]:
    key = tuple(labels.items())
    got = _LABELS.get(key)
    if got is None:
        got = dict(labels)
        if len(_LABELS) < 100_000:
            _LABELS[key] = got
    return got


def _same(got: tuple[Batch, Prepared], batch: Batch, prepared: Prepared) -> bool:
    b, p = got
    if (b.client, b.seq, b.segment, len(b.series)) != (
        batch.client,
        batch.seq,
        batch.segment,
        len(batch.series),
    ):
        return False
    for x, y in zip(b.series, batch.series, strict=True):
        if (x.metric, x.labels) != (y.metric, y.labels):
            return False
        for u, v in ((x.steps, y.steps), (x.values, y.values), (x.times, y.times)):
            if u.tobytes() != v.tobytes():
                return False
    return p.keys == prepared.keys and all(
        a.tobytes() == c.tobytes() for a, c in zip(p.points, prepared.points, strict=True)
    )


def _slots(body: bytes) -> tuple[tuple[int, int] | None, list[dict[str, tuple[int, int]]]]:
    """(offset and length of the seq value, each series' {"steps"|"values"|"times": (offset
    and length of its bin payload)}): a walk over the msgpack structure of a batch, by
    msgpack's own unpacker (its C code: a Python walker was a quarter of a run's first
    report), reading the offsets with ``tell``."""
    u = msgpack.Unpacker(raw=False, strict_map_key=False, max_bin_len=len(body))
    u.feed(body)
    seq, series = None, []
    for _ in range(u.read_map_header()):
        key = u.unpack()
        start = u.tell()
        if key == "seq":
            u.skip()
            seq = (start, u.tell() - start)
        elif key == "series":
            series = []
            for _ in range(u.read_array_header()):
                found: dict[str, tuple[int, int]] = {}
                for _ in range(u.read_map_header()):
                    name = u.unpack()
                    if name in ("steps", "values", "times"):
                        payload = u.unpack()
                        if type(payload) is not bytes:
                            raise _Unsupported("not a bin")
                        end = u.tell()
                        found[name] = (end - len(payload), len(payload))
                    else:
                        u.skip()
                series.append(found)
        else:
            u.skip()
    if u.tell() != len(body):
        raise _Unsupported("trailing bytes")
    return seq, series
