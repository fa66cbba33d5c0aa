"""Storage: keyword-only data-access functions that take a Session, one module per concern.

Runs and series in runs.py, batch ingest in ingest.py, reads in read.py, limits in limits.py,
background compaction in compact.py; engines and write transactions in db.py, tables in
models.py and rule_tables.py. This package re-exports what the API calls.
"""

from __future__ import annotations

from logitwatch.service.store.ingest import IngestResult, Prepared, ingest_batch, prepare_batch
from logitwatch.service.store.limits import LimitError, check_run_quota
from logitwatch.service.store.read import (
    Buckets,
    Points,
    ReadResult,
    bucketize,
    read_points,
    snapshot,
)
from logitwatch.service.store.runs import (
    RunInfo,
    SeriesInfo,
    ensure_run_id,
    get_run,
    list_runs,
    list_series,
    upsert_run,
)

__all__ = [
    "Buckets",
    "IngestResult",
    "LimitError",
    "Points",
    "Prepared",
    "ReadResult",
    "RunInfo",
    "SeriesInfo",
    "bucketize",
    "check_run_quota",
    "ensure_run_id",
    "get_run",
    "ingest_batch",
    "list_runs",
    "list_series",
    "prepare_batch",
    "read_points",
    "snapshot",
    "upsert_run",
]
