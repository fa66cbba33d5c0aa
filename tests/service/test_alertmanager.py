"""Alertmanager: a real prometheus-alertmanager behind a real `logitwatch serve`, and the sender's
claims, re-sends and retries against loopback receivers."""

from __future__ import annotations

import itertools
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from helpers.alertmanager import alertmanager
from helpers.answers import json_of
from helpers.feed import Feeder, S, alerts
from helpers.pg import fresh_database
from helpers.server import live_server
from sqlalchemy import select, update

from logitwatch.service.rules.alertmanager import AlertmanagerSender, am_alert, service_url
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.rules.notify import Notifier
from logitwatch.service.store.db import WRITE, make_engine, make_sessionmaker
from logitwatch.service.store.models import Run, utcnow
from logitwatch.service.store.rule_tables import Alert, Delivery


@contextmanager
def receiver(mode: str = "ok") -> Iterator[tuple[str, list, dict]]:
    """An HTTP server on a free loopback port recording each POSTed JSON body; its answer
    follows ``state["mode"]``: 'ok' 200, 'fail' 500, 'hang' none within 10 s."""
    got: list = []
    state = {"mode": mode}
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            if state["mode"] == "hang":
                release.wait(10)
            code = 200 if state["mode"] == "ok" else 500
            try:
                self.send_response(code)
                self.end_headers()
            except OSError:
                pass  # the client gave up on a hanging answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", got, state
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def until(cond, timeout: float = 20.0, what: str = "condition"):
    """cond()'s first truthy value, polled until the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.05)


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def same_time(a: str, b: str) -> bool:
    """Alertmanager's API shows times to the millisecond."""
    return abs(ts(a) - ts(b)) < timedelta(milliseconds=1)


# --- against a real Alertmanager --------------------------------------------------------


def _am_config(hook: str) -> dict:
    return {
        "route": {
            "receiver": "hook",
            "group_by": ["alertname", "run"],
            "group_wait": "100ms",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {"name": "hook", "webhook_configs": [{"url": f"{hook}/am", "send_resolved": True}]}
        ],
    }


def _post(c: httpx.Client, run: str, seq: int, *series: dict) -> dict:
    body = {"client": "c", "seq": seq, "segment": 0, "series": list(series)}
    return json_of(c.post(f"/api/v1/runs/{run}/points", json=body))


def _rate(am_url: str) -> float:
    """alertmanager_alerts_received_total{status="firing"}: alerts posted to it, firing."""
    text = httpx.get(f"{am_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("alertmanager_alerts_received_total") and 'status="firing"' in line
    )


def test_alerts_reach_alertmanager_and_its_receiver_then_resolve(tmp_path):
    run = "am-run"
    with (
        receiver() as (hook, notes, _),
        alertmanager(_am_config(hook), tmp_path) as am,
        fresh_database("lwtest_am") as db,
    ):
        env = {
            "LOGITWATCH_ALERTMANAGER_RESEND_S": "1",
            "LOGITWATCH_DASHBOARD_URL": "http://grafana.test:3000",
        }
        # Two workers on PostgreSQL: two senders share the alerts instead of doubling the posts.
        with (
            live_server(db, workers=2, args=("--alertmanager", am.url), env=env) as server,
            server.client() as c,
        ):
            fired = _post(
                c, run, 1,
                {"metric": "loss", "steps": [1, 2], "values": [2.0, "NaN"]},
                {"metric": "attn.logit_max", "labels": {"layer": "0", "head": "1"},
                 "steps": [1, 2], "values": [500.0, 600.0]},
            )["alerts"]  # fmt: skip
            assert {a["rule"] for a in fired} == {"nonfinite", "attn-logit-high"}

            def held() -> dict[str, dict]:
                return {a["labels"]["alertname"]: a for a in am.alerts(filter=f'run="{run}"')}

            got = until(lambda: len(held()) == 2 and held(), what="both alerts in Alertmanager")
            mine = {a["rule"]: a for a in json_of(c.get("/api/v1/alerts", params={"run": run}))["alerts"]}  # fmt: skip
            nan, hot = got["nonfinite"], got["attn-logit-high"]
            assert nan["status"]["state"] == "active"
            assert nan["labels"] == {
                "alertname": "nonfinite", "run": run, "severity": "critical", "metric": "loss",
            }  # fmt: skip
            assert hot["labels"] == {
                "alertname": "attn-logit-high", "run": run, "severity": "warning",
                "metric": "attn.logit_max", "layer": "0", "head": "1",
            }  # fmt: skip
            # It went pending at step 1 and firing at step 2 (for_steps 2).
            assert mine["attn-logit-high"]["first_step"] == 1
            assert hot["annotations"]["fired_step"] == "2" == str(mine["attn-logit-high"]["fired_step"])  # fmt: skip
            assert nan["annotations"]["fired_step"] == "2"
            assert "PaLM" in nan["annotations"]["hint"]
            assert nan["annotations"]["summary"] == f"nonfinite on run {run}: loss = NaN at step 2"
            link = f"http://grafana.test:3000/d/logitwatch-run/run-deep-dive?var-run={run}"
            assert nan["annotations"]["dashboard"] == f"{link}&var-step_min=0&var-step_max=202"
            assert nan["generatorURL"] == nan["annotations"]["dashboard"]
            assert same_time(nan["startsAt"], mine["nonfinite"]["fired_at"])
            assert ts(nan["endsAt"]) > ts(nan["startsAt"]) + timedelta(seconds=2)

            # Re-sent every second: Alertmanager's endsAt moves on, once per interval.
            first_end = ts(nan["endsAt"])
            until(lambda: ts(held()["nonfinite"]["endsAt"]) > first_end, 10, "a re-send")
            posts0, t0 = _rate(am.url), time.monotonic()
            time.sleep(4)  # the window over which the two workers' re-sends are counted
            per_alert_s = (_rate(am.url) - posts0) / 2 / (time.monotonic() - t0)
            assert 0.1 < per_alert_s < 1.6, f"{per_alert_s:.2f} posts/s per alert at 1 s resend"

            # The receiver behind Alertmanager heard of both, firing.
            def groups(status: str) -> dict[str, dict]:
                return {n["groupLabels"]["alertname"]: n for n in notes if n["status"] == status}

            until(lambda: len(groups("firing")) == 2, what="the receiver's firing notes")
            note = groups("firing")["nonfinite"]
            assert note["alerts"][0]["labels"]["severity"] == "critical"

            # clear, 20 steps after the last bad point: the rules' hold
            _post(
                c, run, 2,
                {"metric": "loss", "steps": [30], "values": [2.0]},
                {"metric": "attn.logit_max", "labels": {"layer": "0", "head": "1"},
                 "steps": [30], "values": [3.0]},
            )  # fmt: skip
            until(lambda: not held(), what="both alerts resolved in Alertmanager")
            until(lambda: len(groups("resolved")) == 2, what="the receiver's resolved notes")
            mine = {a["rule"]: a for a in json_of(c.get("/api/v1/alerts", params={"run": run}))["alerts"]}  # fmt: skip
            for rule, note in groups("resolved").items():
                (a,) = note["alerts"]
                assert a["status"] == "resolved"
                # endsAt is the resolve time logitwatch sent, not an expiry of the last endsAt.
                assert same_time(a["endsAt"], mine[rule]["resolved_at"]), rule
        engine = make_engine(db)
        try:
            with make_sessionmaker(engine)() as s:
                rows = s.execute(
                    select(Alert.rule, Delivery.event, Delivery.status, Alert.am_due_at)
                    .join(Alert, Alert.id == Delivery.alert_id)
                    .where(Delivery.format == "alertmgr")
                ).all()
        finally:
            engine.dispose()
    # One delivery row per alert for its firing and one for its end; re-sends leave none.
    assert sorted((r, e, st) for r, e, st, _ in rows) == [
        ("attn-logit-high", "firing", "ok"), ("attn-logit-high", "resolved", "ok"),
        ("nonfinite", "firing", "ok"), ("nonfinite", "resolved", "ok"),
    ]  # fmt: skip
    assert {due for *_, due in rows} == {None}  # nothing left to tell
    assert "level=error" not in am.log(), am.log()[-3000:]


def test_serve_refuses_an_alertmanager_url_that_is_not_http():
    bad = subprocess.run(
        [sys.executable, "-m", "logitwatch", "serve", "--alertmanager", "ftp://am:9093"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2, bad.stderr
    assert "LOGITWATCH_ALERTMANAGER_URL" in bad.stderr and "Traceback" not in bad.stderr


# --- the sender, on SQLite and PostgreSQL -----------------------------------------------


@pytest.fixture
def writer(db_url):
    engine = make_engine(db_url)
    yield make_sessionmaker(engine.execution_options(**{WRITE: True}))
    engine.dispose()


def _mine(got: list, run: str) -> list[dict]:
    """The alerts of `run` among every posted list (the PostgreSQL database is shared)."""
    return [a for body in got for a in body if a["labels"]["run"] == run]


def _make_due(sm, run: str) -> None:
    """As if the resend interval had passed."""
    with sm() as s, s.begin():
        ids = select(Alert.id).join(Run, Run.id == Alert.run_id).where(Run.name == run)
        s.execute(
            update(Alert)
            .where(Alert.id.in_(ids), Alert.am_due_at.is_not(None))
            .values(am_due_at=utcnow())
        )


def _am_rows(sm, run: str) -> list[Delivery]:
    q = (
        select(Delivery)
        .join(Alert, Alert.id == Delivery.alert_id)
        .join(Run, Run.id == Alert.run_id)
        .where(Run.name == run, Delivery.format == "alertmgr")
        .order_by(Delivery.id)
    )
    with sm() as s:
        return list(s.scalars(q).all())


def test_two_processes_share_the_work_and_resolved_is_sent_once(writer, run_name):
    with receiver() as (url, got, _):
        one = AlertmanagerSender(writer, url=url, resend_s=3600)
        two = AlertmanagerSender(writer, url=url, resend_s=3600)
        engine = RuleEngine(writer, notifier=Notifier(writer, alertmanager=one))
        f = Feeder(writer, engine, run_name)
        f.send(S("loss", [1, 2], [2.0, math.nan]))  # nonfinite fires at step 2
        before = utcnow()
        # Either process may take it; then there is nothing left for the other.
        assert two.run_once() + one.run_once() == 1 and two.run_once() == one.run_once() == 0
        (firing,) = _mine(got, run_name)
        ends = ts(firing["endsAt"])
        assert before + timedelta(seconds=4 * 3600 - 5) < ends < utcnow() + timedelta(hours=4)
        _make_due(writer, run_name)  # the resend interval passed
        assert one.run_once() + two.run_once() == 1 and len(_mine(got, run_name)) == 2
        f.send(S("loss", [30], [2.0]))  # resolves (clear 20 steps after the NaN)
        assert two.run_once() + one.run_once() == 1
        last = _mine(got, run_name)[-1]
        (a,) = alerts(writer, run_name)
        assert a["state"] == "resolved" and ts(last["endsAt"]) == ts(a["resolved_at"])
        assert last["startsAt"] == firing["startsAt"] and last["labels"] == firing["labels"]
        _make_due(writer, run_name)  # nothing is due once the end was told
        assert one.run_once() + two.run_once() == 0
    rows = _am_rows(writer, run_name)
    assert [(d.event, d.status, d.attempt) for d in rows] == [
        ("firing", "ok", 1),  # the re-send left no row
        ("resolved", "ok", 1),
    ]
    assert rows[0].payload["labels"]["alertname"] == "nonfinite"


def test_silenced_alerts_are_not_sent_and_pending_ones_wait(writer, run_name):
    from logitwatch.service.rules.alerts import create_silence

    with writer() as s:
        create_silence(s, until=utcnow() + timedelta(hours=1), run=run_name, rule="nonfinite")
        s.commit()
    with receiver() as (url, got, _):
        sender = AlertmanagerSender(writer, url=url)
        engine = RuleEngine(writer, notifier=Notifier(writer, alertmanager=sender))
        f = Feeder(writer, engine, run_name)
        f.send(S("loss", [1], [math.nan]), S("attn.logit_max", [1], [500.0], layer="0", head="0"))
        assert {(a["rule"], a["state"]) for a in alerts(writer, run_name)} == {
            ("nonfinite", "firing"), ("attn-logit-high", "pending"),
        }  # fmt: skip
        while sender.run_once():
            pass
        assert _mine(got, run_name) == []
        f.send(S("attn.logit_max", [2], [500.0], layer="0", head="0"))  # now firing
        while sender.run_once():
            pass
        (sent,) = _mine(got, run_name)
        assert sent["labels"]["alertname"] == "attn-logit-high"
        assert sent["annotations"]["fired_step"] == "2"


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_failures_back_off_are_recorded_and_never_touch_ingest(writer, run_name, mode):
    with receiver(mode) as (url, got, state):
        sender = AlertmanagerSender(
            writer, url=url, timeout_s=0.3, backoff_s=0.05, poll_s=0.05, resend_s=3600
        )
        engine = RuleEngine(writer, notifier=Notifier(writer, alertmanager=sender))
        engine.start()
        try:
            f = Feeder(writer, engine, run_name)
            t0 = time.monotonic()
            fired = f.send(S("nonfinite.count", [5], [1.0]))
            assert fired[0]["rule"] == "nonfinite-count" and time.monotonic() - t0 < 5
            until(lambda: len(_am_rows(writer, run_name)) >= 3, what="three failed posts")
            state["mode"] = "ok"  # Alertmanager is back
            until(lambda: any(d.status == "ok" for d in _am_rows(writer, run_name)))
        finally:
            engine.close()
    rows = _am_rows(writer, run_name)
    failed = [d for d in rows if d.status == "failed"]
    assert [d.attempt for d in failed] == list(range(1, len(failed) + 1))
    # each retry waited at least its backoff (0.05 s, 0.1 s, ...)
    assert all(
        (b.sent_at - a.sent_at).total_seconds() >= 0.05 * 2**i
        for i, (a, b) in enumerate(itertools.pairwise(failed))
    )
    if mode == "fail":
        assert {d.status_code for d in failed} == {500} and "HTTP 500" in failed[0].error
    else:
        assert all("Timeout" in d.error for d in failed)
    ok = [d for d in rows if d.status == "ok"]
    assert len(ok) == 1 and ok[0].attempt == len(failed) + 1
    (a,) = alerts(writer, run_name)
    assert a["state"] == "firing"
    with writer() as s:
        row = s.get(Alert, a["id"])
        assert row.am_failures is None and row.am_sent_at is not None
    assert len(_mine(got, run_name)) == len(rows)


def test_postable_alert_shape():
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    alert = {
        "id": 7, "run": "r", "rule": "x", "severity": "info", "state": "firing", "metric": "m",
        "labels": {"run": "shadow", "layer": "3", "empty": ""}, "first_step": 5,
        "fired_step": None, "value": 1.5, "threshold": 1.0, "hint": "h",
        "created_at": "2026-01-01T11:00:00+00:00", "fired_at": "2026-01-01T11:30:00+00:00",
        "resolved_at": None, "resolved_step": None,
    }  # fmt: skip
    out = am_alert(alert, now=now, resend_s=60, service="http://lw:8000")
    assert out["labels"] == {
        "alertname": "x", "run": "r", "severity": "info", "metric": "m",
        "layer": "3", "series_run": "shadow",
    }  # fmt: skip
    assert out["annotations"] == {
        "summary": "x on run r: m{empty=,layer=3,run=shadow} = 1.5 (threshold 1.0) at step 5",
        "hint": "h", "fired_step": "5",
    }  # fmt: skip
    assert out["startsAt"] == "2026-01-01T11:30:00Z" and out["endsAt"] == "2026-01-01T12:04:00Z"
    assert out["generatorURL"] == "http://lw:8000/api/v1/alerts/7"
    done = am_alert(
        {**alert, "state": "resolved", "resolved_at": "2026-01-01T11:40:00+00:00",
         "resolved_step": 9}, now=now, resend_s=60,
    )  # fmt: skip
    assert done["endsAt"] == "2026-01-01T11:40:00Z" and "generatorURL" not in done
    assert done["annotations"]["resolved_step"] == "9"
    assert service_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert service_url("0.0.0.0", 80) == f"http://{socket.gethostname()}:80"  # a linkable name
