"""`logitwatch serve`: migrate the database, then run the service under uvicorn."""

from __future__ import annotations

import argparse
import os
import sys

from logitwatch.service.settings import load_settings
from logitwatch.service.store.db import sqlite_path, upgrade

__all__ = ["add_arguments", "run"]

_FACTORY = "logitwatch.service.app:app_from_env"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", metavar="URL", help="database URL (default: an SQLite file, printed at start)"
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--workers", type=int, help="worker processes (default 1)")
    parser.add_argument("--auth", action="store_true", default=None, help="require API tokens")
    parser.add_argument("--rules", metavar="FILE", help="YAML file of alert rules")
    parser.add_argument(
        "--alertmanager", metavar="URL", help="post firing alerts to this Alertmanager"
    )
    parser.add_argument(
        "--log-level", default="warning", help="uvicorn log level (default warning)"
    )


def run(args: argparse.Namespace) -> int:
    settings = load_settings(
        db_url=args.db,
        host=args.host,
        port=args.port,
        workers=args.workers,
        auth=args.auth,
        rules_file=args.rules,
        alertmanager_url=args.alertmanager,
    )
    path = sqlite_path(settings.db_url)
    where = f"SQLite file {path}" if path else settings.db_url.split("@")[-1]
    print(f"logitwatch: database {where}", flush=True)
    upgrade(settings.db_url)
    if settings.rules_file:  # a bad file stops here with one line naming the field
        from logitwatch.service.rules.user import install_rules_file

        install_rules_file(settings.db_url, settings.rules_file)
    # Build the app once here so that a bad setting (a rules file that does not parse, ...)
    # is one clear error now, not a traceback in each worker.
    from logitwatch.service.app import create_app

    create_app(settings).state.engine.dispose()
    # Worker processes build their app from the environment (uvicorn factory), so the
    # command-line choices travel as LOGITWATCH_* variables.
    for name, value in settings.model_dump().items():
        if value is not None and not isinstance(value, list):
            os.environ[f"LOGITWATCH_{name.upper()}"] = str(value)
    for name in ("webhook_urls", "cors_origins"):
        os.environ[f"LOGITWATCH_{name.upper()}"] = ",".join(getattr(settings, name))
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.auth:
        # Anyone who can reach the port may then write and read every run.
        print(
            f"logitwatch: warning: listening on {settings.host} without --auth: "
            "anyone who reaches this port can read and write every run",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"logitwatch: serving on http://{settings.host}:{settings.port} "
        f"(docs at /docs, {settings.workers} worker{'s' if settings.workers > 1 else ''})",
        flush=True,
    )
    import uvicorn

    from logitwatch.service.api.prom import worker_metrics_dir

    # Several workers share their Prometheus figures through a directory they all write.
    with worker_metrics_dir(settings.workers):
        uvicorn.run(
            _FACTORY,
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=args.log_level,
            access_log=False,
        )
    return 0


if __name__ == "__main__":
    sys.exit(run(argparse.Namespace()))
