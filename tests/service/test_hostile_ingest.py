"""Hostile input to POST points over HTTP (SQLite and PostgreSQL): every refused body is a 4xx
that names the problem, nothing is stored and nothing already stored changes; floods of new
runs or series hit the configured limits while other clients are served."""

from __future__ import annotations

import json
import threading

import msgpack
import pytest
from helpers.server import thread_server
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from logitwatch.protocol import Batch, ProtocolError, decode_batch, encode_batch
from logitwatch.protocol import series_from_columns as S
from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings

MSGPACK = {"content-type": "application/msgpack"}
NASTY = ["x'; DROP TABLE chunks;--", "$(reboot)", "`id`", "a|b", "a b", "é", "a\x00b"]


@pytest.fixture
def api(db_url, run_name):
    app = create_app(load_settings(db_url=db_url, max_series_per_run=50))
    with thread_server(app) as server, server.client() as c:
        victim = f"{run_name}-victim"
        batch = Batch("seed", 1, 0, [S("loss", {}, range(5), [2.0, 1.5, 1.0, 0.5, 0.25]),
                                     S("grad.norm", {"layer": 0}, range(5), [1.0] * 5)])  # fmt: skip
        assert c.post(f"/api/v1/runs/{victim}/points", content=encode_batch(batch),
                      headers=MSGPACK).status_code == 200  # fmt: skip
        # The PostgreSQL database is shared by the test session: room for 30 more runs.
        limit = len(c.get("/api/v1/runs").json()["runs"]) + 30
        app.state.settings = app.state.settings.model_copy(update={"max_runs": limit})
        c.max_runs = limit
        yield c, victim


def _snapshot(c, victim: str):
    info = c.get(f"/api/v1/runs/{victim}").json()
    info.pop("updated_at", None), info.pop("last_seen_at", None)
    series = c.get(f"/api/v1/runs/{victim}/series").json()
    points = [c.get(f"/api/v1/runs/{victim}/metrics/{m}").json() for m in ("loss", "grad.norm")]
    runs = sorted(r["name"] for r in c.get("/api/v1/runs").json()["runs"])
    return info, series, points, runs


def _refused_body(body: bytes, content_type: str) -> bool:
    try:
        decode_batch(body, content_type)
    except ProtocolError:
        return True
    return False


def _mutate(draw) -> bytes:
    body = bytearray(encode_batch(Batch("c", 9, 0, [S("loss", {}, [10, 11], [0.1, 0.2])])))
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, max(0, len(body) - 1)))
        body[i : i + 1] = draw(st.binary(max_size=3))
    return bytes(body)


@st.composite
def hostile(draw):
    kind = draw(st.sampled_from(["random", "mutated", "lengths", "steps", "label", "name"]))
    if kind == "random":
        return draw(st.binary(max_size=512)), "application/msgpack"
    if kind == "mutated":
        return _mutate(draw), "application/msgpack"
    series = {"metric": "loss", "labels": {}, "steps": [10, 11], "values": [0.1, 0.2]}
    if kind == "lengths":
        series["values"] = [0.1] * draw(st.sampled_from([0, 1, 3, 1000]))
    elif kind == "steps":
        series["steps"] = [10, draw(st.sampled_from([-1, -(2**63), 2**62 + 1, 1.5, "7", None]))]
    elif kind == "label":
        series["labels"] = {"k": draw(st.sampled_from(["x" * 129, "x" * 100_000, *NASTY]))}
    else:
        series["metric"] = draw(st.sampled_from([*NASTY, "Loss", "1x", "", "a" * 300]))
    obj = {"client": "c", "seq": 9, "segment": 0, "series": [series]}
    if draw(st.booleans()):
        return json.dumps(obj).encode(), "application/json"
    return msgpack.packb(obj, use_bin_type=True), "application/msgpack"


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=hostile(), target=st.sampled_from(["victim", "new"]))
def test_hostile_bodies_are_4xx_naming_the_field_and_change_nothing(api, case, target):
    c, victim = api
    body, content_type = case
    assume(_refused_body(body, content_type))
    before = _snapshot(c, victim)
    run = victim if target == "victim" else "attack-run"
    r = c.post(f"/api/v1/runs/{run}/points", content=body, headers={"content-type": content_type})
    assert r.status_code in (400, 422), r.text
    answer = r.json()
    assert answer["error"] and answer["detail"][0]["field"] and answer["detail"][0]["message"]
    assert _snapshot(c, victim) == before
    assert c.get("/api/v1/runs/attack-run").status_code == 404


@pytest.mark.parametrize("name", [*NASTY[:5], "..", "-lead"])
def test_metacharacters_in_run_names_are_422_naming_the_run(api, name):
    c, victim = api
    before = _snapshot(c, victim)
    body = encode_batch(Batch("c", 1, 0, [S("loss", {}, [1], [1.0])]))
    r = c.post(f"/api/v1/runs/{name}/points", content=body, headers=MSGPACK)
    assert r.status_code in (404, 422), r.text  # 404: a '/' or '..' that routes nowhere
    if r.status_code == 422:
        assert r.json()["detail"][0]["field"] == "run"
    assert _snapshot(c, victim) == before


def test_duplicate_and_unordered_steps_store_sorted_with_the_last_value(api, run_name):
    c, _ = api
    body = json.dumps({"client": "c", "seq": 1, "series": [
        {"metric": "loss", "steps": [5, 3, 5, 4, 3], "values": [1, 2, 3, 4, 5]}]}).encode()  # fmt: skip
    r = c.post(f"/api/v1/runs/{run_name}/points", content=body,
               headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 200
    (e,) = c.get(f"/api/v1/runs/{run_name}/metrics/loss").json()["series"]
    assert (e["steps"], e["values"]) == ([3, 4, 5], [5.0, 4.0, 3.0])


def test_floods_hit_the_limits_and_others_are_still_served(api, run_name):
    c, victim = api
    codes: list[int] = []

    def flood_runs() -> None:  # one client inventing run after run
        body = encode_batch(Batch("f", 1, 0, [S("loss", {}, [1], [1.0])]))
        for i in range(60):
            codes.append(c.post(f"/api/v1/runs/{run_name}-f{i}/points", content=body,
                                headers=MSGPACK).status_code)  # fmt: skip

    def flood_series() -> None:  # and series after series in one run
        for i in range(30):
            s = [S("attn.logit_max", {"layer": i, "head": h}, [1], [1.0]) for h in range(4)]
            codes.append(c.post(f"/api/v1/runs/{victim}/points", headers=MSGPACK,
                                content=encode_batch(Batch("g", i + 1, 0, s))).status_code)  # fmt: skip

    threads = [threading.Thread(target=flood_runs), threading.Thread(target=flood_series)]
    for t in threads:
        t.start()
    served = 0
    while any(t.is_alive() for t in threads):  # another client meanwhile
        assert c.get(f"/api/v1/runs/{victim}/metrics/loss").status_code == 200
        served += 1
    for t in threads:
        t.join()
    assert served > 0 and set(codes) <= {200, 422, 429} and 422 in codes
    runs = c.get("/api/v1/runs").json()["runs"]
    assert len(runs) == c.max_runs
    assert len(c.get(f"/api/v1/runs/{victim}/series").json()["series"]) <= 50  # max_series
    r = c.post(f"/api/v1/runs/{run_name}-late/points", headers=MSGPACK,
               content=encode_batch(Batch("f", 1, 0, [S("loss", {}, [1], [1.0])])))  # fmt: skip
    assert r.status_code == 422 and "max_runs" in r.json()["detail"][0]["message"]
