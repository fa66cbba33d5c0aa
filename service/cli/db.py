"""`logitwatch db upgrade|compact|stats`: migrations and storage maintenance."""

from __future__ import annotations

import argparse

from logitwatch.service.settings import load_settings
from logitwatch.service.store.compact import compact_all
from logitwatch.service.store.db import make_engine, make_sessionmaker, sqlite_path, upgrade
from logitwatch.service.store.stats import storage_stats

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    for name, help_text in (
        ("upgrade", "migrate the database to the newest schema"),
        ("compact", "merge small chunks now (the server does it when idle), then VACUUM SQLite"),
        ("stats", "print points, chunks and bytes per point on disk"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--db", metavar="URL", help="database URL (default: settings)")
        if name == "compact":
            p.add_argument("--run", help="only this run")


def _where(url: str) -> str:
    path = sqlite_path(url)
    return str(path) if path else url.split("@")[-1]


def run(args: argparse.Namespace) -> int:
    settings = load_settings(db_url=args.db)
    url = settings.db_url
    if args.db_command == "upgrade":
        upgrade(url)
        print(f"logitwatch: database {_where(url)} is at the newest schema")
        return 0
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    try:
        if args.db_command == "compact":
            merged = compact_all(sessions, run=args.run)
            raw = engine.raw_connection()
            try:
                if engine.dialect.name == "sqlite":
                    # Give the freed pages back to the file system (sqlite3 is in
                    # autocommit mode here, see db.make_engine).
                    raw.driver_connection.execute("VACUUM")
                    raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                else:
                    # Make the replaced rows' space reusable (VACUUM FULL would shrink the
                    # table but locks it; run that yourself in a quiet moment).
                    raw.driver_connection.autocommit = True
                    raw.driver_connection.execute("VACUUM ANALYZE chunks")
                    raw.driver_connection.autocommit = False
            finally:
                raw.close()
            print(f"logitwatch: merged {merged} chunks")
        with sessions() as session:
            st = storage_stats(session)
        print(
            f"logitwatch: {st.points:,} points in {st.chunks:,} chunks, {st.bytes:,} bytes "
            f"({st.bytes_per_point:.2f} bytes/point) in {_where(url)}"
        )
    finally:
        engine.dispose()
    return 0
