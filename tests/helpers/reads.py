"""Read back everything a run stored, through the REST API, for exactly-once checks."""

from __future__ import annotations

import httpx

from logitwatch.agent.transport.sink import SeriesKey, series_key

__all__ = ["stored_points"]


def stored_points(url: str, run: str) -> dict[SeriesKey, tuple[list[int], list]]:
    """{series key: (steps, values)}; fails if a series comes back twice or is paged."""
    out: dict[SeriesKey, tuple[list[int], list]] = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        series = c.get(f"/api/v1/runs/{run}/series").json()["series"]
        for metric in sorted({s["metric"] for s in series}):
            body = c.get(f"/api/v1/runs/{run}/metrics/{metric}", params={"limit": 100_000}).json()
            assert body["next_cursor"] is None
            for e in body["series"]:
                key = series_key(metric, **e["labels"])
                assert key not in out, f"{key} came back twice"
                out[key] = (list(e["steps"]), list(e["values"]))
    return out
