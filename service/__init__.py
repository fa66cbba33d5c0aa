"""logitwatch.service: the metrics server (FastAPI + SQLAlchemy), never imports torch.

>>> from logitwatch.service import create_app, load_settings
>>> app = create_app(load_settings(db_url="sqlite:///logitwatch.db"))  # doctest: +SKIP
"""

from importlib import import_module
from typing import Any

__all__ = ["Settings", "create_app", "load_settings", "make_engine", "upgrade"]

# Loaded on first use, so that `logitwatch runs` and friends do not pay for the whole server.
_WHERE = {
    "Settings": "settings",
    "create_app": "app",
    "load_settings": "settings",
    "make_engine": "store.db",
    "upgrade": "store.db",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
