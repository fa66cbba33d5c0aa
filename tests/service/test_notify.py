"""Webhooks against real HTTP receivers on loopback: payloads, retries with backoff, hangs."""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers.feed import Feeder, S, alerts
from sqlalchemy import select

from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.rules.notify import Notifier, parse_webhook
from logitwatch.service.store.db import WRITE, make_engine, make_sessionmaker
from logitwatch.service.store.models import Run
from logitwatch.service.store.rule_tables import Alert, Delivery


@pytest.fixture
def writer(db_url):
    engine = make_engine(db_url)
    yield make_sessionmaker(engine.execution_options(**{WRITE: True}))
    engine.dispose()


@contextmanager
def receiver(mode: str) -> Iterator[tuple[str, list[dict]]]:
    """An HTTP server on a free loopback port: 'ok' answers 200, 'fail' 500, 'hang' never."""
    got: list[dict] = []
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            got.append({"path": self.path, "body": json.loads(body)})
            if mode == "hang":
                release.wait(10)
            code = 200 if mode == "ok" else 500
            try:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"ok" if code == 200 else b"boom")
            except OSError:
                pass  # the client gave up on a hanging answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", got
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def wait_for(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def deliveries(sm, run: str) -> list[Delivery]:
    """The run's delivery attempts (the PostgreSQL database is shared by the test session)."""
    q = (
        select(Delivery)
        .join(Alert, Alert.id == Delivery.alert_id)
        .join(Run, Run.id == Alert.run_id)
        .where(Run.name == run)
        .order_by(Delivery.id)
    )
    with sm() as s:
        return list(s.scalars(q).all())


def test_json_and_slack_payloads_for_firing_and_resolved(writer, run_name):
    with receiver("ok") as (url, got):
        notifier = Notifier(writer, urls=[f"{url}/generic", f"slack+{url}/slack"], poll_s=0.05)
        engine = RuleEngine(writer, notifier=notifier)
        engine.start()
        try:
            f = Feeder(writer, engine, run_name)
            f.send(S("loss", [1, 2], [2.0, math.nan]))
            f.send(S("loss", [3, 30], [2.0, 2.0]))  # resolved once clear for 20 steps
            wait_for(lambda: len(got) == 4)
        finally:
            engine.close()
    generic = [g["body"] for g in got if g["path"] == "/generic"]
    slack = [g["body"] for g in got if g["path"] == "/slack"]
    assert [g["event"] for g in generic] == ["firing", "resolved"]
    alert = generic[0]["alert"]
    assert (alert["run"], alert["rule"], alert["value"], alert["first_step"]) == (
        run_name, "nonfinite", "NaN", 2,
    )  # fmt: skip
    assert "PaLM" in alert["hint"]
    assert slack[0]["text"].startswith("[FIRING critical] nonfinite on run " + run_name)
    assert "Hint:" in slack[0]["text"] and slack[1]["text"].startswith("[RESOLVED")
    assert {d.status for d in deliveries(writer, run_name)} == {"ok"}


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_failing_receivers_are_retried_and_recorded_alert_unaffected(writer, run_name, mode):
    with receiver(mode) as (url, got):
        notifier = Notifier(
            writer, urls=[url], timeout_s=0.3, max_attempts=3, backoff_s=0.05, poll_s=0.05
        )
        engine = RuleEngine(writer, notifier=notifier)
        engine.start()
        try:
            f = Feeder(writer, engine, run_name)
            fired = f.send(S("nonfinite.count", [5], [1.0]))
            assert fired[0]["rule"] == "nonfinite-count"
            wait_for(lambda: [d.status for d in deliveries(writer, run_name)] == ["failed"] * 3)
        finally:
            engine.close()
    rows = deliveries(writer, run_name)
    assert [d.attempt for d in rows] == [1, 2, 3]
    # each retry waited at least the backoff (0.05 s, then 0.1 s)
    assert all(b.next_at > a.sent_at for a, b in itertools.pairwise(rows))
    if mode == "fail":
        assert {d.status_code for d in rows} == {500} and "HTTP 500" in rows[0].error
    else:
        assert all("Timeout" in d.error for d in rows)
    assert len(got) == 3
    (a,) = alerts(writer, run_name)
    assert a["state"] == "firing"


def test_webhook_urls_are_checked():
    assert parse_webhook("https://hooks.slack.com/services/x")[0] == "slack"
    assert parse_webhook("http://127.0.0.1:9/x") == ("json", "http://127.0.0.1:9/x")
    with pytest.raises(ValueError, match="webhook_urls"):
        parse_webhook("ftp://example.com")


def test_webhooks_carry_the_step_the_alert_fired_at(writer, run_name):
    """attn-logit-high needs two points: it begins at step 10 and fires at step 20."""
    with receiver("ok") as (url, got):
        notifier = Notifier(writer, urls=[url, f"slack+{url}/slack"], poll_s=0.05)
        engine = RuleEngine(writer, notifier=notifier)
        engine.start()
        try:
            f = Feeder(writer, engine, run_name)
            f.send(S("attn.logit_max", [10, 20], [150.0, 160.0], layer="0", head="1"))
            wait_for(lambda: len(got) == 2)
        finally:
            engine.close()
    generic = next(g["body"] for g in got if g["path"] != "/slack")
    slack = next(g["body"] for g in got if g["path"] == "/slack")
    assert generic["fired_step"] == 20 and generic["alert"]["fired_step"] == 20
    assert generic["alert"]["first_step"] == 10
    assert "firing at step 20 (from step 10)" in generic["summary"]
    assert "firing at step 20" in slack["text"]
