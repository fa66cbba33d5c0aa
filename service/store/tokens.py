"""API tokens: made once from 32 random bytes, kept only as a SHA-256 hash, checked in constant time.

A token is ``lw_`` + 43 url-safe characters. Its hash is the lookup key, so the plaintext is shown
once at creation and never stored or logged. A plain hash (no salt, no slow KDF) is enough here
because the secret is 256 random bits, not a password a person chose.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase

from sqlalchemy import select
from sqlalchemy.orm import Session

from logitwatch.service.store.models import Token

__all__ = [
    "PREFIX",
    "SCOPES",
    "NewToken",
    "authenticate",
    "create_token",
    "hash_token",
    "list_tokens",
    "new_secret",
    "revoke_token",
    "run_allowed",
    "scope_allows",
]

PREFIX = "lw_"
#: admin may do everything; read and ingest only themselves.
SCOPES = ("ingest", "read", "admin")


def new_secret() -> str:
    """A fresh token: ``lw_`` and 256 random bits, url-safe."""
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def scope_allows(granted: str, needed: str) -> bool:
    """admin ⊇ read, ingest; read and ingest are disjoint."""
    return granted == "admin" or granted == needed


def run_allowed(pattern: str | None, run: str) -> bool:
    """A token without a pattern reaches every run; with one, runs matching it (fnmatch, case-sensitive)."""
    return pattern is None or fnmatchcase(run, pattern)


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    return scope


def _check_pattern(pattern: str | None) -> str | None:
    if pattern is not None and not (1 <= len(pattern) <= 128):
        raise ValueError("run pattern must be 1-128 characters (fnmatch, for example 'exp-*')")
    return pattern


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token just created: ``secret`` is the only copy of the plaintext there will ever be."""

    id: int
    name: str
    scope: str
    run_pattern: str | None
    secret: str


def create_token(
    session: Session, *, scope: str, name: str = "", run_pattern: str | None = None
) -> NewToken:
    _check_scope(scope)
    _check_pattern(run_pattern)
    if len(name) > 128:
        raise ValueError("name must be at most 128 characters")
    secret = new_secret()
    row = Token(
        name=name,
        token_hash=hash_token(secret),
        scope=scope,
        run_pattern=run_pattern,
        created_at=datetime.now(UTC),
    )
    session.add(row)
    session.flush()
    return NewToken(row.id, name, scope, run_pattern, secret)


def list_tokens(session: Session, *, include_revoked: bool = False) -> list[Token]:
    q = select(Token).order_by(Token.id)
    if not include_revoked:
        q = q.where(Token.revoked_at.is_(None))
    return list(session.scalars(q))


def revoke_token(session: Session, *, token_id: int) -> bool:
    """Revoke by id; False if there is no such live token."""
    row = session.get(Token, token_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = datetime.now(UTC)
    return True


def authenticate(session: Session, *, token: str) -> Token | None:
    """The live token row for a presented secret, or None.

    The lookup is by hash (an attacker cannot steer a SHA-256 preimage, so the index walk leaks
    nothing useful); the final equality is still constant time.
    """
    if not token.startswith(PREFIX) or len(token) > 256:
        return None
    digest = hash_token(token)
    row = session.scalars(select(Token).where(Token.token_hash == digest)).first()
    if row is None or row.revoked_at is not None:
        return None
    return row if hmac.compare_digest(row.token_hash, digest) else None
