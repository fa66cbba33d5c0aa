"""Service settings: one pydantic-settings class read from LOGITWATCH_* variables, failing fast."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "default_db_path", "load_settings"]

MiB = 1024 * 1024


def default_db_path() -> Path:
    """$LOGITWATCH_HOME/logitwatch.db, else ~/.local/share/logitwatch/logitwatch.db (XDG data dir)."""
    home = os.environ.get("LOGITWATCH_HOME")
    if home:
        return Path(home).expanduser() / "logitwatch.db"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "logitwatch" / "logitwatch.db"


def _list(value: Any) -> Any:
    # Environment values may be a JSON list or a comma-separated string.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything the service reads at start.

    >>> load_settings(db_url="sqlite:///:memory:", port=8123).port
    8123
    """

    model_config = SettingsConfigDict(env_prefix="LOGITWATCH_", extra="forbid")

    #: SQLAlchemy URL; SQLite by default so `logitwatch serve` needs nothing else.
    db_url: str = Field(default_factory=lambda: f"sqlite:///{default_db_path()}")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    #: Tokens are off by default: the default bind is loopback.
    auth: bool = False
    metrics_auth: bool = False
    body_limit_bytes: int = Field(default=32 * MiB, ge=1024)
    max_series_per_run: int = Field(default=100_000, ge=1)
    #: New run names beyond this many runs are refused (422): a runaway client cannot flood.
    max_runs: int = Field(default=100_000, ge=1)
    #: Runs silent for longer drop out of /metrics, keeping its cardinality bounded.
    run_inactive_after_s: float = Field(default=3600.0, gt=0)
    rules_file: str | None = None
    webhook_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    dashboard_url: str | None = None
    #: Alertmanager's base URL: firing alerts go to its API v2, re-sent every resend interval.
    alertmanager_url: str | None = None
    alertmanager_resend_s: float = Field(default=60.0, gt=0, le=86_400)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("webhook_urls", "cors_origins", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _list(value)

    @field_validator("db_url")
    @classmethod
    def _db_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(f"{value!r} is not a database URL") from None
        if url.get_backend_name() == "postgresql":
            # psycopg 3 is the driver we ship; plain postgresql:// would look for psycopg2.
            if url.drivername in ("postgresql", "postgres"):
                url = url.set(drivername="postgresql+psycopg")
            return url.render_as_string(hide_password=False)
        if url.get_backend_name() != "sqlite":
            raise ValueError(
                f"{url.drivername!r} is not supported; use sqlite:///PATH or postgresql+psycopg://..."
            )
        return value

    @field_validator("alertmanager_url")
    @classmethod
    def _alertmanager_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        from logitwatch.service.rules.alertmanager import check_alertmanager_url

        return check_alertmanager_url(value)

    @field_validator("rules_file")
    @classmethod
    def _rules_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"rules file {value!r} does not exist")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from overrides and LOGITWATCH_* variables; a bad value is one clear ValueError."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        raise ValueError(
            f"setting {name} (LOGITWATCH_{name.split('.')[0].upper()}): {msg}"
        ) from None
