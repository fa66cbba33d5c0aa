"""The user's rule set in the database: one row, replaced atomically, versioned for every process."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from logitwatch.service.rules.model import Rule, parse_rules, rules_to_data
from logitwatch.service.store.deferred import driver_rows
from logitwatch.service.store.models import utcnow
from logitwatch.service.store.rule_tables import UserRules
from logitwatch.service.store.sql import insert

__all__ = [
    "effective_rules",
    "get_user_rules",
    "install_rules_file",
    "put_user_rules",
    "user_rules_version",
    "version_of",
    "version_statement",
]

_ROW = 1


def version_statement() -> tuple[str, tuple]:
    """PostgreSQL: user_rules_version's read, to send ahead with other statements; its rows
    give the version as ``version_of`` reads them."""
    return _VERSION.format("%s"), (_ROW,)


def version_of(rows: list) -> int:
    return (rows[0][0] if rows else 0) or 0


def user_rules_version(session: Session) -> int:
    """The user rules' version, 0 when none were ever set. Asked by every ingest transaction:
    one driver-level statement (SQLAlchemy's Core select cost ~0.3 ms of Python), after the
    session's own pending changes are flushed, as an ORM query would."""
    session.flush()
    found = driver_rows(session, version_statement(), (_VERSION.format("?"), (_ROW,)))
    return version_of(found)


_VERSION = "SELECT version FROM user_rules WHERE id = {}"


def get_user_rules(session: Session) -> tuple[int, list[Rule], str]:
    """(version, rules, source); version 0 and no rules when none were ever set."""
    row = session.get(UserRules, _ROW)
    if row is None or not row.version:
        return 0, [], ""
    return row.version, parse_rules(row.rules), row.source


def put_user_rules(session: Session, *, rules: list[Rule], source: str = "api") -> int:
    """Replace the whole rule set (the caller commits); returns the new version.

    Writing the same rules again keeps the version, so several workers loading one
    ``--rules`` file at start do not make each other reload.
    """
    data: list[dict[str, Any]] = rules_to_data(rules)
    # Make sure the row exists, then lock it: two processes writing at once queue up here.
    session.execute(
        insert(session, UserRules.__table__)
        .values(id=_ROW, version=0, rules=[], source="", updated_at=utcnow())
        .on_conflict_do_nothing()
    )
    row = session.get(UserRules, _ROW, with_for_update=True, populate_existing=True)
    assert row is not None
    if row.rules == data and row.version:
        return row.version
    row.version += 1
    row.rules = data
    row.source = source
    row.updated_at = utcnow()
    return row.version


def effective_rules(builtin: list[Rule], user: list[Rule]) -> list[Rule]:
    """Built-ins, each replaced by a user rule of the same name, then the other user rules;
    rules with ``enabled: false`` are left out."""
    by_name = {r.name: r for r in builtin}
    for r in user:
        by_name[r.name] = r
    return [r for r in by_name.values() if r.enabled]


def install_rules_file(db_url: str, path: str) -> int:
    """``serve --rules FILE``: validate the file (ValueError, one line) and make it the user rules."""
    from logitwatch.service.rules.builtin import builtin_rules
    from logitwatch.service.rules.model import RuleError, check_references, load_rules_file
    from logitwatch.service.store.db import WRITE, make_engine, make_sessionmaker

    rules = load_rules_file(path)
    try:
        check_references(rules, builtin_rules())
    except RuleError as exc:
        raise ValueError(f"--rules {path}: {exc}") from None
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine.execution_options(**{WRITE: True}))() as session:
            version = put_user_rules(session, rules=rules, source=str(path))
            session.commit()
    finally:
        engine.dispose()
    return version
