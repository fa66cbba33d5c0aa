"""Rendering read results as JSON (non-finite floats spelled 'NaN', 'Infinity', '-Infinity')
or msgpack (arrays as packed little-endian bytes, as in the ingest protocol)."""

from __future__ import annotations

import json
import re
from typing import Any

import msgpack
import numpy as np
from fastapi import Request, Response

from logitwatch.protocol import MSGPACK_CONTENT_TYPE
from logitwatch.service.store.read import Buckets, Points, ReadResult

__all__ = ["floats_json", "render_read", "wants_msgpack"]

_NONFINITE = re.compile(r"-?Infinity|NaN")
_INT_FIELDS = ("steps", "last_steps", "count", "nan")


def floats_json(a: np.ndarray) -> str:
    """A JSON list of floats; fast because json.dumps of a plain list runs in C."""
    text = json.dumps(a.tolist())
    if not np.isfinite(a).all():
        # json.dumps spells them NaN/Infinity/-Infinity, which is not JSON: quote them.
        text = _NONFINITE.sub(lambda m: f'"{m.group(0)}"', text)
    return text


def wants_msgpack(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "msgpack" in accept


def _arrays(entry: Points | Buckets) -> dict[str, np.ndarray]:
    if isinstance(entry, Points):
        return {"steps": entry.steps, "values": entry.values, "times": entry.times}
    return {
        name: getattr(entry, name)
        for name in ("steps", "last_steps", "count", "min", "max", "first", "last", "nan")
    }


def render_read(request: Request, head: dict[str, Any], result: ReadResult) -> Response:
    """{...head, next_cursor, series: [{labels, segment, <columns>}]} in JSON or msgpack."""
    head = {**head, "next_cursor": result.next_cursor}
    if wants_msgpack(request):
        series = []
        for e in result.series:
            cols = {
                k: np.ascontiguousarray(v, dtype="<i8" if k in _INT_FIELDS else "<f8").tobytes()
                for k, v in _arrays(e).items()
            }
            series.append({"labels": e.labels, "segment": e.segment, **cols})
        body = msgpack.packb({**head, "series": series}, use_bin_type=True)
        return Response(body, media_type=MSGPACK_CONTENT_TYPE)
    parts = []
    for e in result.series:
        cols = ",".join(
            f'"{k}":' + (json.dumps(v.tolist()) if k in _INT_FIELDS else floats_json(v))
            for k, v in _arrays(e).items()
        )
        parts.append(
            f'{{"labels":{json.dumps(e.labels)},"segment":{json.dumps(e.segment)},{cols}}}'
        )
    text = json.dumps(head)[:-1] + ',"series":[' + ",".join(parts) + "]}"
    return Response(text.encode(), media_type="application/json")
