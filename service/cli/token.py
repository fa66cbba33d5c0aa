"""``logitwatch token create|list|revoke``: API tokens, managed on the server's database directly.

``create`` prints the token once (only its hash is stored); run it where the service's database
is reachable, with the same ``--db`` (or LOGITWATCH_DB_URL) as ``logitwatch serve``.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from logitwatch.service.settings import load_settings
from logitwatch.service.store.db import make_engine, make_sessionmaker, upgrade
from logitwatch.service.store.tokens import SCOPES, create_token, list_tokens, revoke_token
from logitwatch.tables import Col, Records, num

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    db_help = "database URL (default: as `logitwatch serve`)"
    parser.add_argument("--db", metavar="URL", help=db_help)
    # --db also after the action; SUPPRESS keeps an absent one from hiding the first.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", metavar="URL", help=db_help, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a token and print it once", parents=[common])
    create.add_argument("--scope", required=True, choices=SCOPES, help="admin ⊇ read, ingest")
    create.add_argument("--run", dest="run_pattern", metavar="PATTERN",
                        help="reach only runs matching this fnmatch pattern, e.g. 'exp-*'")  # fmt: skip
    create.add_argument("--name", default="", help="a note saying what the token is for")
    lst = sub.add_parser("list", help="list tokens (never their secrets)", parents=[common])
    lst.add_argument("--all", action="store_true", help="include revoked tokens")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    revoke = sub.add_parser("revoke", help="revoke a token by id", parents=[common])
    revoke.add_argument("id", type=int)


def _when(t) -> str | None:
    return t.isoformat(timespec="seconds") if t is not None else None


def run(args: argparse.Namespace) -> int:
    settings = load_settings(db_url=args.db)
    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    try:
        with make_sessionmaker(engine)() as session, session.begin():
            if args.action == "create":
                tok = create_token(
                    session, scope=args.scope, name=args.name, run_pattern=args.run_pattern
                )
            elif args.action == "revoke":
                if not revoke_token(session, token_id=args.id):
                    print(f"logitwatch: error: no live token with id {args.id}", file=sys.stderr)
                    return 1
                print(f"revoked token {args.id}")
                return 0
            else:
                rows = list_tokens(session, include_revoked=args.all)
    finally:
        engine.dispose()
    if args.action == "create":
        where = f", runs '{tok.run_pattern}'" if tok.run_pattern else ""
        print(f"created token {tok.id} (scope {tok.scope}{where}); it is shown only this once:",
              file=sys.stderr)  # fmt: skip
        print(tok.secret)
        return 0
    items = [
        {
            "id": r.id,
            "name": r.name,
            "scope": r.scope,
            "run_pattern": r.run_pattern,
            "created_at": _when(r.created_at),
            "revoked_at": _when(r.revoked_at),
        }
        for r in rows
    ]
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    # Date and time as two words, so a narrow column wraps between them.
    table = Records([num("id"), Col("name", readable=32), "scope", Col("runs", readable=16),
                     Col("created", readable=10), Col("revoked", readable=10)],
                    title="tokens (times in UTC)")  # fmt: skip
    for it in items:
        created, revoked = (t.replace("T", " ").removesuffix("+00:00") if t else ""
                            for t in (it["created_at"], it["revoked_at"]))  # fmt: skip
        table.add_row(str(it["id"]), it["name"], it["scope"], it["run_pattern"] or "*",
                      created, revoked)  # fmt: skip
    Console().print(table)
    return 0
