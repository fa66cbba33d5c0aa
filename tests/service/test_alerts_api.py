"""Alerts, silences and rules over HTTP on a real uvicorn (SQLite and PostgreSQL)."""

from __future__ import annotations

import math

from logitwatch.protocol import Batch, encode_batch, series_from_columns


def post(client, run, seq, *series):
    batch = Batch("c", seq, 0, list(series))
    r = client.post(
        f"/api/v1/runs/{run}/points",
        content=encode_batch(batch),
        headers={"content-type": "application/msgpack"},
    )
    assert r.status_code == 200, r.text
    return r.json()["alerts"]


def S(metric, steps, values, **labels):
    return series_from_columns(metric, labels, steps, values)


def test_ingest_answer_alert_queries_and_ack(client, run_name):
    (a,) = post(client, run_name, 1, S("loss", [1, 2], [3.0, math.inf]))
    keys = {"id", "rule", "severity", "metric", "labels", "first_step", "last_step", "value"}
    assert keys | {"threshold", "hint", "state"} <= a.keys()
    assert (a["rule"], a["state"], a["value"]) == ("nonfinite", "firing", "Infinity")
    post(client, run_name, 2, S("attn.logit_max", [3], [150.0], layer="1", head="0"))
    got = client.get("/api/v1/alerts", params={"run": run_name}).json()["alerts"]
    assert {(x["rule"], x["state"]) for x in got} == {
        ("nonfinite", "firing"),
        ("attn-logit-high", "pending"),
    }
    crit = client.get(
        "/api/v1/alerts", params={"run": run_name, "state": "firing", "severity": "critical"}
    ).json()["alerts"]
    assert [x["id"] for x in crit] == [a["id"]]
    r = client.get("/api/v1/alerts", params={"state": "burning"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "state"
    acked = client.post(f"/api/v1/alerts/{a['id']}/ack", json={"by": "alice"}).json()
    assert acked["acked"] and acked["acked_by"] == "alice" and acked["state"] == "firing"
    assert client.get(f"/api/v1/alerts/{a['id']}").json()["acked"]
    assert client.post("/api/v1/alerts/999999/ack").status_code == 404
    # /metrics exposes firing alerts
    line = f'logitwatch_alerts_firing{{rule="nonfinite",run="{run_name}",severity="critical"}} 1.0'
    assert line in client.get("/metrics").text.splitlines()


def test_silences_hide_alerts_from_the_ingest_answer_until_deleted(client, run_name):
    r = client.post("/api/v1/silences", json={"run": run_name, "rule": "nonfinite-count",
                                              "duration_s": 3600, "comment": "known"})  # fmt: skip
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["active"]
    assert post(client, run_name, 1, S("nonfinite.count", [1], [2.0])) == []
    (listed,) = client.get("/api/v1/alerts", params={"run": run_name}).json()["alerts"]
    assert listed["silenced"] and listed["state"] == "firing"
    assert sid in [s["id"] for s in client.get("/api/v1/silences?active=true").json()["silences"]]
    assert client.delete(f"/api/v1/silences/{sid}").status_code == 200
    assert client.get(f"/api/v1/silences/{sid}").status_code == 404
    assert [a["rule"] for a in post(client, run_name, 2, S("loss", [2], [1.0]))] == [
        "nonfinite-count"
    ]
    r = client.post("/api/v1/silences", json={"duration_s": 60})
    assert r.status_code == 422 and "run, a rule or labels" in r.text
    r = client.post("/api/v1/silences", json={"rule": "x", "until": "2030-01-01T00:00:00"})
    assert r.status_code == 422 and "time zone" in r.text


def test_rules_get_put_and_validation(client, run_name):
    body = client.get("/api/v1/rules").json()
    assert "attn-logit-high" in body["effective"]
    assert all("source" in r for r in body["builtin"])
    bad = {"rules": [{"name": "x", "metric": "loss", "condition": {"kind": "growth", "ratio": 0.0,
                                                                   "over_steps": 3}}]}  # fmt: skip
    r = client.put("/api/v1/rules", json=bad)
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "rules[0].condition.ratio"
    r = client.put("/api/v1/rules", json={"rules": [{"name": "x", "metric": "loss",
        "condition": {"kind": "nonfinite"}, "preceded_by": {"rule": "nope"}}]})  # fmt: skip
    assert r.json()["detail"][0]["field"] == "rules[0].preceded_by.rule"
    yaml_rules = (
        "rules:\n"
        "  - name: tput-low\n"
        "    metric: throughput.tokens_per_s\n"
        "    condition: {kind: threshold, op: '<', value: 100}\n"
        "    severity: info\n"
        "    hint: check the data loader\n"
        "  - name: nonfinite\n"
        "    metric: loss\n"
        "    condition: {kind: nonfinite}\n"
        "    enabled: false\n"
    )
    r = client.put(
        "/api/v1/rules", content=yaml_rules, headers={"content-type": "application/yaml"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] >= 1 and "nonfinite" not in r.json()["effective"]
    assert [x["name"] for x in client.get("/api/v1/rules").json()["rules"]] == [
        "tput-low",
        "nonfinite",
    ]
    fired = post(
        client, run_name, 1, S("throughput.tokens_per_s", [1], [5.0]), S("loss", [1], [math.nan])
    )
    assert [(a["rule"], a["severity"], a["hint"]) for a in fired] == [
        ("tput-low", "info", "check the data loader")
    ]
    # a failed PUT changes nothing
    assert client.put("/api/v1/rules", json=bad).status_code == 422
    assert len(client.get("/api/v1/rules").json()["rules"]) == 2
    assert client.put("/api/v1/rules", json={"rules": []}).status_code == 200


def test_run_scoped_tokens_see_their_runs_alerts_only(db_url, run_name):
    from helpers.server import thread_server

    from logitwatch.service.app import create_app
    from logitwatch.service.settings import load_settings
    from logitwatch.service.store.tokens import create_token

    app = create_app(load_settings(db_url=db_url, auth=True))
    with app.state.sessionmaker() as s, s.begin():
        admin = create_token(s, scope="admin").secret
        scoped = create_token(s, scope="read", run_pattern=f"{run_name}-a*").secret
    with thread_server(app) as server, server.client() as c:
        c.headers["authorization"] = f"Bearer {admin}"
        mine = post(c, f"{run_name}-a", 1, S("loss", [1], [math.nan]))[0]
        theirs = post(c, f"{run_name}-b", 1, S("loss", [1], [math.nan]))[0]
        c.headers["authorization"] = f"Bearer {scoped}"
        seen = {a["id"] for a in c.get("/api/v1/alerts").json()["alerts"]}
        assert mine["id"] in seen and theirs["id"] not in seen
        assert c.get(f"/api/v1/alerts/{theirs['id']}").status_code == 404
        assert c.post(f"/api/v1/alerts/{theirs['id']}/ack").status_code == 404
        assert c.post(f"/api/v1/alerts/{mine['id']}/ack").json()["acked"]


def test_two_service_processes_share_rules_and_state_and_fire_once(pg_url, run_name, tmp_path):
    from helpers.server import live_server

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "- name: lr-too-high\n  metric: lr\n  condition: {kind: threshold, value: 0.01}\n"
        "  hint: lower the LR\n"
    )
    with (
        live_server(pg_url, args=("--rules", str(rules))) as a,
        live_server(pg_url) as b,
        a.client() as ca,
        b.client() as cb,
    ):
        try:
            # `serve --rules FILE` put the file's rules in the database: both processes use them.
            body = cb.get("/api/v1/rules").json()
            assert body["source"] == str(rules) and body["rules"][0]["name"] == "lr-too-high"
            (lr,) = post(cb, run_name, 1, S("lr", [1], [0.1], group="0"))
            assert (lr["rule"], lr["hint"], lr["threshold"]) == (
                "lr-too-high",
                "lower the LR",
                0.01,
            )
            # attn-logit-high needs two points above 100: the first reaches one process, the
            # second the other, which sees the first's state in the database.
            attn = {"layer": "0", "head": "0"}
            assert post(ca, run_name, 2, S("attn.logit_max", [10], [150.0], **attn)) == [lr]
            fired = post(cb, run_name, 3, S("attn.logit_max", [20], [160.0], **attn))[1]
            assert (fired["rule"], fired["first_step"], fired["last_step"]) == (
                "attn-logit-high", 10, 20,
            )  # fmt: skip
            for i, c in enumerate([ca, cb, ca, cb]):
                got = post(c, run_name, 4 + i, S("attn.logit_max", [30 + i], [150.0], **attn))
                assert [x["id"] for x in got] == [lr["id"], fired["id"]]
            assert len(cb.get("/api/v1/alerts", params={"run": run_name}).json()["alerts"]) == 2
        finally:  # the PostgreSQL database is shared by the test session
            ca.put("/api/v1/rules", json={"rules": []})
