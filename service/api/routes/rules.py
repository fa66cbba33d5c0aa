"""GET|PUT /api/v1/rules: the user's rules (JSON or YAML), replaced atomically, and the built-ins."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from logitwatch.service.api.auth import require
from logitwatch.service.api.deps import RulesDep, SessionDep, WriterDep
from logitwatch.service.api.errors import ApiError
from logitwatch.service.rules.model import (
    Rule,
    RuleError,
    check_references,
    parse_rules,
    parse_rules_text,
    rules_to_data,
)
from logitwatch.service.rules.user import effective_rules, get_user_rules, put_user_rules

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/rules", tags=["rules"])
_MAX_BODY = 1 << 20


async def _body(request: Request) -> bytes:
    body = await request.body()
    if len(body) > _MAX_BODY:
        raise ApiError(413, "too_large", f"a rule set is at most {_MAX_BODY} bytes")
    return body


def _view(version: int, source: str, user: list[Rule], builtin: list[Rule]) -> dict[str, Any]:
    return {
        "version": version,
        "source": source,
        "rules": rules_to_data(user),
        "builtin": rules_to_data(builtin),
        "effective": [r.name for r in effective_rules(builtin, user)],
    }


@router.get("", dependencies=[Depends(require("read"))], summary="The rules in force")
def get_rules(session: SessionDep, engine: RulesDep) -> dict:
    """User rules (``rules``), built-in rules, and the names of the rules in force."""
    version, user, source = get_user_rules(session)
    return _view(version, source, user, engine.builtin)


@router.put(
    "",
    dependencies=[Depends(require("admin"))],
    summary="Replace the user rules",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/yaml": {"schema": {"type": "string"}},
            },
            "required": True,
        }
    },
)
def put_rules(
    request: Request,
    body: Annotated[bytes, Depends(_body)],
    engine: RulesDep,
    writer: WriterDep,
) -> dict:
    """``{"rules": [...]}`` as JSON, or the same as YAML; all or nothing (422 names the field)."""
    ctype = (request.headers.get("content-type") or "application/json").split(";")[0].strip()
    try:
        if ctype in ("application/yaml", "application/x-yaml", "text/yaml", "text/plain"):
            rules = parse_rules_text(body.decode("utf-8", "replace"))
        else:
            try:
                data = json.loads(body or b"null")
            except ValueError as exc:
                raise ApiError(400, "bad_request", f"body is not JSON: {exc}") from None
            rules = parse_rules(data)
        builtin = engine.builtin
        check_references(rules, builtin)
    except RuleError as exc:
        raise ApiError(422, "invalid", exc.errors) from None
    with writer() as session:
        version = put_user_rules(session, rules=rules, source="api")
        session.commit()
    return _view(version, "api", rules, builtin)
