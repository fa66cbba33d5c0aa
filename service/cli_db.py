"""`logitwatch db upgrade`: apply the Alembic migrations to the configured database."""

from __future__ import annotations

import argparse

from .db import sqlite_path, upgrade
from .settings import load_settings

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = sub.add_parser("upgrade", help="migrate the database to the newest schema")
    up.add_argument(
        "--db", metavar="URL", help="database URL (default: LOGITWATCH_DB_URL or the SQLite file)"
    )


def run(args: argparse.Namespace) -> int:
    settings = load_settings(db_url=args.db)
    upgrade(settings.db_url)
    path = sqlite_path(settings.db_url)
    print(f"logitwatch: database {path or settings.db_url.split('@')[-1]} is at the newest schema")
    return 0
