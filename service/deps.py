"""FastAPI dependencies as Annotated aliases: SessionDep, SettingsDep, WriteSessionDep."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from .settings import Settings

__all__ = ["SessionDep", "SettingsDep", "get_session", "get_settings"]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session for one request; committed by the endpoint that writes, closed here."""
    with request.app.state.sessionmaker() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
