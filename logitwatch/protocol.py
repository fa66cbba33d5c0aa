"""Wire protocol v1 between the agent and the service: batches of columnar series.

A batch is ``{client, seq, segment, series: [{metric, labels, steps, values, times}]}``,
sent as msgpack (the agent's default) or JSON. In msgpack the three arrays may be lists or
packed little-endian bytes (``steps`` int64, ``values``/``times`` float64), which is what the
agent sends: NaN and ±Inf survive bit for bit and decoding costs one memcpy. JSON has no
NaN, so JSON spells non-finite values as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` (numbers are accepted too).

Both sides import this module; it needs only the standard library and msgpack.
"""

from __future__ import annotations

import json
import math
import re
import sys
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

__all__ = [
    "JSON_CONTENT_TYPE",
    "MAX_LABELS",
    "MAX_LABEL_VALUE_LEN",
    "MAX_POINTS_PER_BATCH",
    "MSGPACK_CONTENT_TYPE",
    "PROTOCOL_VERSION",
    "Batch",
    "ProtocolError",
    "Series",
    "check_label_key",
    "check_label_value",
    "check_metric_name",
    "check_run_name",
    "decode_batch",
    "dump_float",
    "encode_batch",
    "load_float",
    "series_from_columns",
]

PROTOCOL_VERSION = 1
MSGPACK_CONTENT_TYPE = "application/msgpack"
JSON_CONTENT_TYPE = "application/json"

MAX_LABELS = 8
MAX_LABEL_VALUE_LEN = 128
MAX_SERIES_PER_BATCH = 20_000
MAX_POINTS_PER_BATCH = 5_000_000
MAX_STEP = 2**62

_RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_METRIC_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
_LABEL_KEY_RE = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:/\-]*$")
_LITTLE = sys.byteorder == "little"


class ProtocolError(ValueError):
    """A batch that does not follow the protocol; ``field`` is the path of the bad part."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_run_name(name: str, field: str = "run") -> str:
    if not isinstance(name, str) or not _RUN_RE.match(name):
        raise ProtocolError(
            field,
            "run names are 1-128 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit",
        )
    return name


def check_metric_name(name: Any, field: str = "metric") -> str:
    if not isinstance(name, str) or len(name) > 128 or not _METRIC_RE.match(name):
        raise ProtocolError(
            field,
            "metric names are dotted lower-case words of [a-z0-9_] (for example "
            "'attn.logit_max'), at most 128 characters",
        )
    return name


def check_label_key(key: Any, field: str) -> str:
    if not isinstance(key, str) or not _LABEL_KEY_RE.match(key):
        raise ProtocolError(field, "label keys are [a-z_][a-z0-9_]*, at most 64 characters")
    return key


def check_label_value(value: Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ProtocolError(field, "label values are strings (or integers)")
    value = str(value)
    if len(value) > MAX_LABEL_VALUE_LEN or not _LABEL_VALUE_RE.match(value):
        raise ProtocolError(
            field,
            f"label values are at most {MAX_LABEL_VALUE_LEN} characters of "
            "letters, digits and _ . : / -",
        )
    return value


def dump_float(x: float) -> float | str:
    """JSON spelling of a float: non-finite values become 'NaN', 'Infinity', '-Infinity'."""
    if math.isfinite(x):
        return x
    if math.isnan(x):
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"


_NONFINITE = {
    "NaN": math.nan,
    "nan": math.nan,
    "Infinity": math.inf,
    "inf": math.inf,
    "+Infinity": math.inf,
    "-Infinity": -math.inf,
    "-inf": -math.inf,
}


def load_float(x: Any, field: str) -> float:
    if isinstance(x, bool):
        raise ProtocolError(field, "expected a number, got a boolean")
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x in _NONFINITE:
        return _NONFINITE[x]
    raise ProtocolError(field, "expected a number or 'NaN', 'Infinity', '-Infinity'")


@dataclass(slots=True)
class Series:
    """One series' points in a batch. ``times`` are Unix seconds (may be empty)."""

    metric: str
    labels: dict[str, str]
    steps: array  # array('q')
    values: array  # array('d')
    times: array = field(default_factory=lambda: array("d"))

    def __post_init__(self) -> None:
        if not isinstance(self.steps, array) or self.steps.typecode != "q":
            self.steps = array("q", self.steps)
        if not isinstance(self.values, array) or self.values.typecode != "d":
            self.values = array("d", self.values)
        if not isinstance(self.times, array) or self.times.typecode != "d":
            self.times = array("d", self.times)

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return self.metric, tuple(sorted(self.labels.items()))

    @classmethod
    def _of_arrays(
        cls, metric: str, labels: dict[str, str], steps: array, values: array, times: array
    ) -> Series:
        """A series from arrays the decoder just made and typed: no conversion checks."""
        series = object.__new__(cls)
        series.metric, series.labels = metric, labels
        series.steps, series.values, series.times = steps, values, times
        return series


@dataclass(slots=True)
class Batch:
    """A batch of points from one client. ``(run, client, seq)`` makes it idempotent."""

    client: str
    seq: int
    segment: int = 0
    series: list[Series] = field(default_factory=list)

    @property
    def n_points(self) -> int:
        return sum(len(s.steps) for s in self.series)


def _packed(a: array) -> bytes:
    if _LITTLE:
        return a.tobytes()
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


def _unpack(data: bytes, typecode: str, field: str) -> array:
    a = array(typecode)
    if len(data) % a.itemsize:
        raise ProtocolError(
            field, f"packed array length {len(data)} is not a multiple of {a.itemsize}"
        )
    a.frombytes(data)
    if not _LITTLE:
        a.byteswap()
    return a


def encode_batch(batch: Batch, *, fmt: str = "msgpack") -> bytes:
    """Encode a batch; msgpack packs arrays as raw bytes, JSON spells non-finite floats."""
    if fmt == "msgpack":
        return msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "client": batch.client,
                "seq": batch.seq,
                "segment": batch.segment,
                "series": [
                    {
                        "metric": s.metric,
                        "labels": s.labels,
                        "steps": _packed(s.steps),
                        "values": _packed(s.values),
                        "times": _packed(s.times),
                    }
                    for s in batch.series
                ],
            },
            use_bin_type=True,
        )
    if fmt == "json":
        return json.dumps(
            {
                "v": PROTOCOL_VERSION,
                "client": batch.client,
                "seq": batch.seq,
                "segment": batch.segment,
                "series": [
                    {
                        "metric": s.metric,
                        "labels": s.labels,
                        "steps": list(s.steps),
                        "values": [dump_float(v) for v in s.values],
                        "times": [dump_float(t) for t in s.times],
                    }
                    for s in batch.series
                ],
            },
            allow_nan=False,
            separators=(",", ":"),
        ).encode()
    raise ValueError(f"fmt must be 'msgpack' or 'json', not {fmt!r}")


def _int_field(obj: Mapping, name: str, *, default: int | None = None, lo: int = 0) -> int:
    if name not in obj:
        if default is None:
            raise ProtocolError(name, "is required")
        return default
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, int) or not (lo <= v <= MAX_STEP):
        raise ProtocolError(name, f"must be an integer between {lo} and 2**62")
    return v


def _steps(raw: Any, field: str) -> array:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        a = _unpack(bytes(raw), "q", field)
        if a and (min(a) < 0 or max(a) > MAX_STEP):
            raise ProtocolError(field, "steps must be between 0 and 2**62")
        return a
    if not isinstance(raw, list):
        raise ProtocolError(field, "must be a list of integers or packed int64 bytes")
    for i, s in enumerate(raw):
        if isinstance(s, bool) or not isinstance(s, int) or not (0 <= s <= MAX_STEP):
            raise ProtocolError(f"{field}[{i}]", "steps are integers between 0 and 2**62")
    return array("q", raw)


def _floats(raw: Any, field: str) -> array:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return _unpack(bytes(raw), "d", field)
    if not isinstance(raw, list):
        raise ProtocolError(field, "must be a list of numbers or packed float64 bytes")
    try:
        return array("d", raw)
    except TypeError:
        return array("d", (load_float(x, f"{field}[{i}]") for i, x in enumerate(raw)))


#: (metric, label items) → (labels, sorted key) of the pairs that passed the checks: a fleet
#: sends the same few hundred series in every request, and checking their names cost more
#: than decoding their points. Only all-string pairs are stored, so a lookup needs no type
#: checks: an integer or boolean label value never equals a string one.
_VALID_NAMES: dict[tuple, tuple[dict[str, str], tuple]] = {}


def _checked_names(metric: Any, labels_raw: Any, path: str) -> tuple[dict[str, str], tuple]:
    """The labels of a series and its key, from the cache or checked (and then cached)."""
    try:
        key = (metric, tuple(labels_raw.items()))
        hit = _VALID_NAMES.get(key)
    except (AttributeError, TypeError):  # not a map, or unhashable parts: checked below
        key, hit = None, None
    if hit is not None:
        return hit
    metric = check_metric_name(metric, f"{path}.metric")
    if not isinstance(labels_raw, Mapping):
        raise ProtocolError(f"{path}.labels", "must be an object of string keys and values")
    if len(labels_raw) > MAX_LABELS:
        raise ProtocolError(f"{path}.labels", f"at most {MAX_LABELS} labels")
    labels = {
        check_label_key(k, f"{path}.labels"): check_label_value(v, f"{path}.labels.{k}")
        for k, v in labels_raw.items()
    }
    hit = labels, (metric, tuple(sorted(labels.items())))
    all_str = type(metric) is str and all(type(v) is str for v in labels_raw.values())
    if key is not None and all_str and len(_VALID_NAMES) < 100_000:
        _VALID_NAMES[key] = hit
    return hit


def _series(obj: Any, path: str) -> tuple[Series, tuple]:
    """One series and its key (metric, sorted label items)."""
    if type(obj) is not dict:
        if not isinstance(obj, Mapping):
            raise ProtocolError(path, "each series must be an object")
        obj = dict(obj)
    labels, key = _checked_names(obj.get("metric"), obj.get("labels") or {}, path)
    raw_steps, raw_values, raw_times = obj.get("steps"), obj.get("values"), obj.get("times")
    if (raw_steps is None or raw_values is None) and ("steps" not in obj or "values" not in obj):
        raise ProtocolError(path, "each series needs 'steps' and 'values'")
    if type(raw_steps) is bytes and type(raw_values) is bytes and len(raw_steps) == 8:
        # The agent's one-step report: one int64 and one float64, read without the
        # general path's loops (the step's range is still checked).
        steps, values = array("q"), array("d")
        steps.frombytes(raw_steps)
        if len(raw_values) == 8:
            values.frombytes(raw_values)
        else:
            values = _floats(raw_values, f"{path}.values")
        if not _LITTLE:
            steps.byteswap()
            values.byteswap()
        if not 0 <= steps[0] <= MAX_STEP:
            raise ProtocolError(f"{path}.steps", "steps must be between 0 and 2**62")
    else:
        steps = _steps(raw_steps, f"{path}.steps")
        values = _floats(raw_values, f"{path}.values")
    if type(raw_times) is bytes and len(raw_times) == 8 and _LITTLE:
        times = array("d", raw_times)  # a one-step time without _floats: ~10 % of its decoding
    else:
        times = _floats(raw_times or [], f"{path}.times")
    if len(values) != len(steps):
        raise ProtocolError(
            f"{path}.values", f"has {len(values)} values for {len(steps)} steps; lengths must match"
        )
    if len(times) not in (0, len(steps)):
        raise ProtocolError(
            f"{path}.times", f"has {len(times)} times for {len(steps)} steps; empty or equal"
        )
    return Series._of_arrays(key[0], dict(labels), steps, values, times), key


def decode_batch(body: bytes, content_type: str | None = None) -> Batch:
    """Decode and validate a batch; raises ProtocolError naming the bad field."""
    ct = (content_type or MSGPACK_CONTENT_TYPE).split(";")[0].strip().lower()
    try:
        if ct in ("application/json", "text/json"):
            obj = json.loads(body)
        elif ct in ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack"):
            obj = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=len(body))
        else:
            raise ProtocolError(
                "content-type", f"{ct!r} is not supported; use {MSGPACK_CONTENT_TYPE} or JSON"
            )
    except ProtocolError:
        raise
    except Exception as exc:  # malformed bytes of any kind
        raise ProtocolError("body", f"malformed {ct.split('/')[-1]}: {exc}") from None
    if not isinstance(obj, Mapping):
        raise ProtocolError("body", "a batch is an object with client, seq, segment, series")
    if obj.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError("v", f"protocol version {obj.get('v')!r} is not supported (use 1)")
    client = obj.get("client")
    if not isinstance(client, str) or not (1 <= len(client) <= 128) or not _RUN_RE.match(client):
        raise ProtocolError("client", "must be 1-128 characters of letters, digits, '_', '.', '-'")
    seq = _int_field(obj, "seq")
    segment = _int_field(obj, "segment", default=0)
    raw_series = obj.get("series")
    if not isinstance(raw_series, list):
        raise ProtocolError("series", "must be a list")
    if len(raw_series) > MAX_SERIES_PER_BATCH:
        raise ProtocolError("series", f"at most {MAX_SERIES_PER_BATCH} series per batch")
    series, seen, n_points = [], set(), 0
    for i, raw in enumerate(raw_series):
        one, key = _series(raw, f"series[{i}]")
        if key in seen:
            raise ProtocolError(
                f"series[{i}]", "the same metric and labels appear twice in one batch"
            )
        seen.add(key)
        series.append(one)
        n_points += len(one.steps)
    if n_points > MAX_POINTS_PER_BATCH:
        raise ProtocolError("series", f"at most {MAX_POINTS_PER_BATCH} points per batch")
    return Batch(client=client, seq=seq, segment=segment, series=series)


def series_from_columns(
    metric: str,
    labels: Mapping[str, Any] | None,
    steps: Iterable[int],
    values: Iterable[float],
    times: Iterable[float] = (),
) -> Series:
    """Convenience constructor used by clients and tests."""
    return Series(
        metric,
        {k: str(v) for k, v in (labels or {}).items()},
        array("q", steps),
        array("d", values),
        array("d", times),
    )
