"""Tokens: random, hashed at rest, scoped, run patterns, revocation; on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from logitwatch.service.store.models import Token
from logitwatch.service.store.tokens import (
    PREFIX,
    authenticate,
    create_token,
    hash_token,
    list_tokens,
    new_secret,
    revoke_token,
    run_allowed,
    scope_allows,
)


def test_secrets_are_prefixed_random_and_long():
    a, b = new_secret(), new_secret()
    assert a.startswith(PREFIX) and b.startswith(PREFIX) and a != b
    assert len(a) >= len(PREFIX) + 43  # 256 bits, url-safe base64


@pytest.mark.parametrize(
    ("granted", "needed", "ok"),
    [
        ("admin", "admin", True),
        ("admin", "read", True),
        ("admin", "ingest", True),
        ("read", "read", True),
        ("read", "ingest", False),
        ("read", "admin", False),
        ("ingest", "ingest", True),
        ("ingest", "read", False),
        ("ingest", "admin", False),
    ],
)
def test_admin_includes_read_and_ingest(granted, needed, ok):
    assert scope_allows(granted, needed) is ok


def test_run_patterns_are_fnmatch_and_case_sensitive():
    assert run_allowed(None, "anything")
    assert run_allowed("exp-*", "exp-1") and not run_allowed("exp-*", "prod-1")
    assert not run_allowed("exp-*", "EXP-1")
    assert run_allowed("exp-?", "exp-7") and not run_allowed("exp-?", "exp-17")


def test_stored_hashed_found_by_secret_and_revoked(sessions):
    with sessions() as s, s.begin():
        tok = create_token(s, scope="read", name="grafana", run_pattern="exp-*")
    with sessions() as s:
        rows = s.scalars(select(Token).where(Token.id == tok.id)).all()
        assert [r.token_hash for r in rows] == [hash_token(tok.secret)]
        assert tok.secret not in {r.token_hash for r in rows}  # never the plaintext
        row = authenticate(s, token=tok.secret)
        assert row is not None and (row.scope, row.run_pattern) == ("read", "exp-*")
        assert authenticate(s, token=tok.secret + "x") is None
        assert authenticate(s, token="not-a-token") is None
    with sessions() as s, s.begin():
        assert revoke_token(s, token_id=tok.id)
        assert not revoke_token(s, token_id=tok.id)  # already revoked
    with sessions() as s:
        assert authenticate(s, token=tok.secret) is None
        assert tok.id not in [r.id for r in list_tokens(s)]
        assert tok.id in [r.id for r in list_tokens(s, include_revoked=True)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"scope": "write"}, "scope"), ({"scope": "read", "run_pattern": ""}, "run pattern")],
)
def test_bad_token_requests_name_the_field(sessions, kwargs, field):
    with sessions() as s, pytest.raises(ValueError, match=field):
        create_token(s, **kwargs)
