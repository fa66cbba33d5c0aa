"""Read back everything a run stored, through the REST API, for exactly-once checks."""

from __future__ import annotations

import httpx

from logitwatch.agent.transport.sink import SeriesKey, series_key

from .answers import json_of

__all__ = ["stored_points"]


def stored_points(url: str, run: str) -> dict[SeriesKey, tuple[list[int], list]]:
    """{series key: (steps, values)}; fails if a series comes back twice or is paged."""
    out: dict[SeriesKey, tuple[list[int], list]] = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        series = json_of(c.get(f"/api/v1/runs/{run}/series"))["series"]
        for metric in sorted({s["metric"] for s in series}):
            r = c.get(f"/api/v1/runs/{run}/metrics/{metric}", params={"limit": 100_000})
            body = json_of(r)
            assert body["next_cursor"] is None
            for e in body["series"]:
                key = series_key(metric, **e["labels"])
                assert key not in out, f"{key} came back twice"
                out[key] = (list(e["steps"]), list(e["values"]))
    return out
