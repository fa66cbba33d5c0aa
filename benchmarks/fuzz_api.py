"""The longer schemathesis run: every operation of the OpenAPI schema, auth off and on.

    .venv/bin/python benchmarks/fuzz_api.py                 # 200 examples per operation
    .venv/bin/python benchmarks/fuzz_api.py --examples 1000 --db postgresql+psycopg://...

Fails (exit 1) on any 5xx, undocumented status, or answer off-schema; prints one line per
operation. The bounded version runs in the test suite (tests/service/test_schemathesis.py).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings
from logitwatch.service.store.db import upgrade
from logitwatch.service.store.tokens import create_token


@contextlib.contextmanager
def serve(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def fuzz(url: str, headers: dict, examples: int) -> int:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failed = 0
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def check(case) -> None:
            # positive_data_acceptance is off: name rules are not spelled as schema patterns.
            case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

        t0 = time.monotonic()
        try:
            check()
            print(f"  ok    {op.label}  ({time.monotonic() - t0:.1f} s)", flush=True)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            failed += 1
            print(f"  FAIL  {op.label}\n{exc}", flush=True)
    return failed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=200, help="examples per operation")
    p.add_argument("--db", help="database URL (default: a fresh SQLite file)")
    args = p.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        db_url = args.db or f"sqlite:///{Path(tmp) / 'fuzz.db'}"
        upgrade(db_url)
        for auth in (False, True):
            app = create_app(load_settings(db_url=db_url, auth=auth))
            headers = {}
            if auth:
                with app.state.sessionmaker() as s, s.begin():
                    headers["authorization"] = f"Bearer {create_token(s, scope='admin').secret}"
            print(f"auth {'on' if auth else 'off'}: {args.examples} examples per operation")
            with serve(app) as url:
                failed += fuzz(url, headers, args.examples)
    print("OK" if not failed else f"{failed} operations failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
