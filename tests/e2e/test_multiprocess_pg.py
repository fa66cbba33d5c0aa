"""Two real service processes on one PostgreSQL database, fed interleaved batches of one run
(half of them sent to both), lose and duplicate nothing, and never answer 503 (a deadlock)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from helpers.answers import json_of
from helpers.pg import fresh_database
from helpers.server import live_servers

from logitwatch.protocol import Batch, encode_batch, series_from_columns

RUN = "shared-run"
N_BATCHES = 40
STEPS_PER_BATCH = 20


def _batch(i: int) -> Batch:
    # Series appear over time (new layers every 10 batches), so both processes race to
    # create the same series; every batch covers its own step range.
    steps = np.arange(i * STEPS_PER_BATCH, (i + 1) * STEPS_PER_BATCH)
    series = [series_from_columns("loss", {}, steps, steps * 0.001)]
    series += [
        series_from_columns("act.rms", {"layer": layer}, steps, steps + layer)
        for layer in range(i // 10 + 1)
    ]
    return Batch(client=f"rank{i % 3}", seq=i, segment=0, series=series)


def _post(url: str, batch: Batch) -> dict:
    r = httpx.post(
        f"{url}/api/v1/runs/{RUN}/points",
        content=encode_batch(batch),
        headers={"content-type": "application/msgpack"},
        timeout=60,
    )
    return json_of(r)


def test_two_processes_one_postgres_database():
    with fresh_database("lwtest_e2e") as db_url, live_servers(db_url, 2) as (a, b):
        jobs = [((a, b)[i % 2].url, _batch(i)) for i in range(N_BATCHES)]
        # every other batch is also sent to the other process at the same time (a client
        # retrying through a load balancer): the two race for its record and its rows
        jobs += [((b, a)[i % 2].url, _batch(i)) for i in range(0, N_BATCHES, 2)]
        jobs.sort(key=lambda job: job[1].seq)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda job: _post(*job), jobs))
        assert sum(not x["duplicate"] for x in answers) == N_BATCHES
        assert sum(x["duplicate"] for x in answers) == len(jobs) - N_BATCHES

        total = N_BATCHES * STEPS_PER_BATCH
        with a.client() as c:
            series = c.get(f"/api/v1/runs/{RUN}/series").json()["series"]
            assert len(series) == 1 + N_BATCHES // 10
            loss = c.get(f"/api/v1/runs/{RUN}/metrics/loss").json()["series"][0]
            assert loss["steps"] == list(range(total))
            assert loss["values"] == [s * 0.001 for s in range(total)]
            for layer in range(N_BATCHES // 10):
                (got,) = c.get(f"/api/v1/runs/{RUN}/metrics/act.rms?layer={layer}").json()["series"]
                first = layer * 10 * STEPS_PER_BATCH
                assert got["steps"] == list(range(first, total))
                assert got["values"] == [float(s + layer) for s in range(first, total)]
        with b.client() as c:
            run = c.get(f"/api/v1/runs/{RUN}").json()
            assert (run["max_segment"], run["last_step"]) == (0, total - 1)
            counts = {
                (s["metric"], s["labels"].get("layer")): s["n_points"]
                for s in c.get(f"/api/v1/runs/{RUN}/series").json()["series"]
            }
            assert counts[("loss", None)] == total
