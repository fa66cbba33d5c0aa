"""Every FastAPI dependency of the service, as an ``Annotated`` alias.

This is the only module of the API that reads ``app.state``: endpoints and the auth layer
declare what they need (``SettingsDep``, ``SessionDep``, ``WriterDep``, ``RulesDep``…) and get it.
The lookups are ``async def``: FastAPI runs a plain ``def`` dependency on its thread pool,
a thread hand-off per dependency per request for one attribute read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.service.api.ingest import Ingest
from logitwatch.service.api.prom import ServiceMetrics
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.settings import Settings
from logitwatch.service.store import snapshot
from logitwatch.service.store.compact import Compactor
from logitwatch.service.store.db import Writer

__all__ = [
    "CompactorDep",
    "EngineDep",
    "IngestDep",
    "MetricsDep",
    "ReadsDep",
    "RulesDep",
    "SessionDep",
    "SettingsDep",
    "WriterDep",
    "get_compactor",
    "get_engine",
    "get_ingest",
    "get_metrics",
    "get_reads",
    "get_rules",
    "get_session",
    "get_settings",
    "get_writer",
]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_reads(request: Request) -> sessionmaker[Session]:
    """The read-session factory, for a dependency that needs a session only sometimes (auth)."""
    return request.app.state.sessionmaker


def get_session(request: Request) -> Iterator[Session]:
    """A read session for one request, shared by its dependencies (auth) and its endpoint.

    On PostgreSQL it reads one snapshot (REPEATABLE READ; these sessions never write): a read
    of points takes several statements (a run's reports, then its chunks), and under READ
    COMMITTED a flush and a rewrite committed between them could show one step's old value
    beside another step's new one, a state the database never held."""
    with request.app.state.sessionmaker() as session:
        snapshot(session)
        yield session


async def get_writer(request: Request) -> Writer:
    """Write transactions: ``with writer() as session: …; session.commit()``."""
    return request.app.state.writer


async def get_ingest(request: Request) -> Ingest:
    """POST points' group commit (api/ingest.py)."""
    return request.app.state.ingest


async def get_rules(request: Request) -> RuleEngine:
    return request.app.state.rules


async def get_compactor(request: Request) -> Compactor:
    return request.app.state.compactor


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.prom


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
ReadsDep = Annotated[sessionmaker[Session], Depends(get_reads)]
SessionDep = Annotated[Session, Depends(get_session)]
WriterDep = Annotated[Writer, Depends(get_writer)]
IngestDep = Annotated[Ingest, Depends(get_ingest)]
RulesDep = Annotated[RuleEngine, Depends(get_rules)]
CompactorDep = Annotated[Compactor, Depends(get_compactor)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
