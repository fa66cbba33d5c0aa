"""logitwatch.service: the metrics server (FastAPI + SQLAlchemy), never imports torch."""

__all__: list[str] = []
