"""The HTTP sink: streams batches to the service, spools to disk while it cannot.

Two threads: the collector (batcher.py) encodes and routes each batch, to an in-memory
outbox while the service answers and to the disk spool while it does not (or when the
outbox is full); the poster sends the spool first, then the outbox, in order, retrying with
backoff and honouring Retry-After. Nothing here raises into the training loop.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import threading
import time as _time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitwatch.agent.transport.batcher import BatchingSink, log
from logitwatch.agent.transport.poster import Backoff, Poster
from logitwatch.agent.transport.spool import (
    BATCH,
    RUN,
    Spool,
    SpoolBusy,
    default_spool_dir,
    read_state,
    write_state,
)
from logitwatch.protocol import (
    MAX_POINTS_PER_BATCH,
    Batch,
    ProtocolError,
    decode_batch,
    encode_batch,
)

__all__ = ["HttpSink", "SenderConfig", "Undelivered"]

_CLOSING_RETRY_S = 0.5  # while close() waits for the service, look for it this often
_COUNT_BUDGET_S = 2.0  # reading the spool back to count its steps stops after this


@dataclass(frozen=True)
class Undelivered:
    """What a closed HttpSink could not deliver: spooled on disk, waiting for ``command``."""

    run: str
    server: str
    spool_dir: Path
    steps: int  # distinct training steps with at least one undelivered point
    first_step: int | None
    last_step: int | None
    points: int
    batches: int  # records in the spool (each a batch of one or more steps)
    lost_batches: int = 0  # batches the disk refused too: gone with the process
    complete: bool = True  # False: the spool was too large to count in time (at least ...)
    token: bool = False  # the service wants a token: sync needs LOGITWATCH_TOKEN or --token

    @property
    def command(self) -> str:
        """The exact command that delivers the spooled points."""
        return f"logitwatch sync {shlex.quote(str(self.spool_dir))} --server {shlex.quote(self.server)}"

    @property
    def message(self) -> str:
        at_least = "" if self.complete else "at least "
        span = ""
        if self.first_step is not None:
            span = (
                f"step {self.first_step}"
                if self.first_step == self.last_step
                else f"steps {self.first_step}-{self.last_step}"
            ) + ", "
        lines = []
        if self.batches:
            lines += [
                f"logitwatch: {at_least}{self.steps} steps of run {self.run!r} ({span}"
                f"{self.points:,} points in {self.batches} batches) were not delivered to "
                f"{self.server}; they are spooled in {self.spool_dir}. Deliver them with:",
                f"  {self.command}"
                + ("   (token in LOGITWATCH_TOKEN, or --token)" if self.token else ""),
                "(a later run with this spool directory delivers them too)",
            ]
        if self.lost_batches:
            lines.append(
                f"logitwatch: {self.lost_batches} more batches could not be written to the "
                "spool either (disk full?) and are lost."
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.message


@dataclass
class SenderConfig:
    """How the sender batches, buffers and retries. Defaults suit one process per GPU."""

    batch_interval_s: float = 1.0  # one request a second keeps the service's row rate low
    max_points_per_batch: int = 50_000  # ~1 MB of msgpack: well under the 32 MiB body limit
    max_memory_mb: float = 64.0  # queued steps + encoded batches; beyond it, spill to disk
    request_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0  # a restarted service is picked up within this
    max_retry_after_s: float = 300.0  # cap on a service's Retry-After, so we never sleep for days
    compression: str = "none"  # "gzip" trades sender CPU for bandwidth on slow links
    close_timeout_s: float = 10.0  # close()/flush() without a timeout wait at most this
    spool_file_mb: float = 16.0  # spool files rotate at this size; delivered files are deleted

    def __post_init__(self) -> None:
        for name in (
            "batch_interval_s",
            "max_memory_mb",
            "request_timeout_s",
            "backoff_initial_s",
            "backoff_max_s",
            "spool_file_mb",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"sender.{name} must be a positive number, not {v!r}.")
        for name in ("max_retry_after_s", "close_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"sender.{name} must be zero or a positive number, not {v!r}.")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("sender.backoff_max_s must be at least sender.backoff_initial_s.")
        m = self.max_points_per_batch
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_POINTS_PER_BATCH:
            raise ValueError(
                f"sender.max_points_per_batch must be an integer in 1..{MAX_POINTS_PER_BATCH}, "
                f"not {m!r}."
            )
        if self.compression not in ("none", "gzip"):
            raise ValueError(
                f"sender.compression must be 'none' or 'gzip', not {self.compression!r}."
            )


class HttpSink(BatchingSink):
    """Streams a run's points to a logitwatch service.

    >>> sink = HttpSink("http://127.0.0.1:8000", "my-run")  # doctest: +SKIP
    >>> sink.log(0, {("loss", ()): 2.5}); sink.close(timeout=5)  # doctest: +SKIP

    ``resume_from_step``: the step a resumed run restarts at; if the run already has points
    at or beyond it, every batch goes to a new segment (max_segment + 1).
    """

    def __init__(
        self,
        server: str,
        run: str,
        *,
        token: str | None = None,
        spool_dir: str | Path | None = None,
        resume_from_step: int | None = None,
        config: SenderConfig | None = None,
    ) -> None:
        self.config = config or SenderConfig()
        super().__init__(
            run,
            interval=self.config.batch_interval_s,
            max_points_per_batch=self.config.max_points_per_batch,
            max_queue_bytes=self.config.max_memory_mb * 2**19,  # half the budget
            close_timeout=self.config.close_timeout_s,
            name=f"logitwatch-collector-{run}",
        )
        if not isinstance(server, str) or not server.startswith(("http://", "https://")):
            raise ValueError(f"server must be an http(s) URL, not {server!r}.")
        self.resume_from_step = resume_from_step
        self.spool_dir = Path(spool_dir) if spool_dir is not None else default_spool_dir(run)
        self.spool = self._open_spool()
        self._poster = Poster(
            server,
            run,
            token=token,
            timeout=self.config.request_timeout_s,
            compression=self.config.compression,
        )
        self._lock = threading.Lock()
        self._outbox: deque[list] = deque()  # [kind, data] records, oldest first
        self._outbox_bytes = 0
        self._outbox_cap = self.config.max_memory_mb * 2**19
        self._offline = False
        self._closing = False  # close() is waiting for the service: retry often
        self._has_token = token is not None
        self.undelivered: Undelivered | None = None
        self._alerts: list[dict[str, Any]] = []
        self._state: dict[str, Any] = {}
        self.delivered_batches = 0
        self._post_wake = threading.Event()
        self._post_stop = threading.Event()
        self._nudge = threading.Event()  # cuts a backoff wait short (close)
        self._poster_thread = threading.Thread(
            target=self._post_loop, name=f"logitwatch-sender-{run}", daemon=True
        )
        self._start()
        self._poster_thread.start()

    # -- Sink API ------------------------------------------------------------------------
    def firing_alerts(self) -> list[dict[str, Any]]:
        return list(self._alerts)

    @property
    def offline(self) -> bool:
        """True while the service is not answering (batches go to the spool)."""
        return self._offline

    # -- start-up (collector thread) -------------------------------------------------------
    def _open_spool(self) -> Spool | None:
        try:
            return Spool(self.spool_dir, file_bytes=int(self.config.spool_file_mb * 2**20))
        except SpoolBusy:
            # Two processes for one run (per-rank reporting): each gets its own directory;
            # ``logitwatch sync`` on the parent directory uploads both.
            self.spool_dir = self.spool_dir.with_name(f"{self.spool_dir.name}.{self.client}")
            log.warning("spool in use by another process; using %s", self.spool_dir)
            return self._open_spool()
        except OSError as exc:
            self.once("spool", "cannot open the spool %s (%s): memory only", self.spool_dir, exc)
            return None

    def _prepare(self) -> None:
        """Choose the segment: the run's current one, or a new one when resuming."""
        local = read_state(self.spool_dir)
        if isinstance(local.get("max_segment"), int):
            self.segment = max(0, local["max_segment"])  # in case the service never answers
        remote = self._poster.run_info()
        if remote is None:
            self.once("unreachable", "service unreachable at start; using local run state")
            remote = {}
        segs = [s.get("max_segment") for s in (local, remote)]
        steps = [s.get("last_step") for s in (local, remote)]
        segs = [s for s in segs if isinstance(s, int)]
        steps = [s for s in steps if isinstance(s, int)]
        self.segment = max([0, *segs])  # the service says -1 before the first point
        if self.resume_from_step is not None and steps and max(steps) >= self.resume_from_step:
            self.segment += 1
            log.info(
                "run %s resumes at step %d: segment %d",
                self.run,
                self.resume_from_step,
                self.segment,
            )

    # -- collector: encode and route -------------------------------------------------------
    def _emit_batch(self, batch: Batch) -> None:
        self._route(BATCH, encode_batch(batch))
        state = {"run": self.run, "max_segment": self.segment, "last_step": self.last_step}
        if state != self._state and self.spool is not None:
            try:
                write_state(self.spool_dir, state)
                self._state = state
            except OSError as exc:
                self.once("state", "cannot write the run state in %s: %s", self.spool_dir, exc)

    def _emit_run(self, entry) -> None:
        body = {"config": entry.config, "tags": entry.tags}
        self._route(RUN, json.dumps(body, default=str).encode())

    def _route(self, kind: bytes, data: bytes) -> None:
        with self._lock:
            # Behind anything already on disk (order), or on disk while offline (durable).
            to_disk = self._offline or (self.spool is not None and self.spool.pending() > 0)
            self._outbox.append([kind, data])
            self._outbox_bytes += len(data)
            if to_disk or self._outbox_bytes > self._outbox_cap:
                self._spill()
            while self._outbox_bytes > 2 * self._outbox_cap and len(self._outbox) > 1:
                _, old = self._outbox.popleft()  # nowhere left to keep it: disk refused too
                self._outbox_bytes -= len(old)
                self.once("dropped", "no room in memory or on disk: dropping old batches")
        self._post_wake.set()

    def _spill(self) -> None:
        """Move the outbox, oldest first, to the spool (lock held)."""
        if self.spool is None:
            return
        while self._outbox:
            kind, data = self._outbox[0]
            try:
                self.spool.append(kind, data)
            except OSError as exc:
                self.once("spool write", "cannot write the spool %s: %s", self.spool_dir, exc)
                return
            self._outbox.popleft()
            self._outbox_bytes -= len(data)

    def _delivered(self) -> bool:
        return not self._outbox

    # -- poster thread ---------------------------------------------------------------------
    def _next_record(self) -> tuple[Any, bytes, bytes] | None:
        with self._lock:
            if self.spool is not None and self.spool.pending() > 0:
                rec = self.spool.peek()
                if rec is not None:
                    return rec, rec.kind, rec.data
            if self._outbox:
                rec = self._outbox[0]
                return rec, rec[0], rec[1]
        return None

    def _done(self, rec: Any) -> None:
        with self._lock:
            if isinstance(rec, list):
                if self._outbox and self._outbox[0] is rec:
                    self._outbox.popleft()
                    self._outbox_bytes -= len(rec[1])
            elif self.spool is not None:
                self.spool.ack(rec)
        self._notify()

    def _post_loop(self) -> None:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        while not self._post_stop.is_set():
            try:
                item = self._next_record()
                if item is None:
                    self._post_wake.wait(self.config.batch_interval_s)
                    self._post_wake.clear()
                    continue
                rec, kind, data = item
                out = self._poster.send(kind, data)
                if self._post_stop.is_set() and not out.ok:
                    return  # closed meanwhile: close() already put the record on disk
                if out.ok:
                    if kind == BATCH:
                        self._alerts = list(out.answer.get("alerts") or [])
                        self.delivered_batches += 1
                    if self._offline:
                        log.info("service reachable again: replaying the spool")
                    self._offline = False
                    backoff.reset()
                    self._done(rec)
                elif out.retry:
                    self.once(
                        out.kind,
                        "service: %s (%s); keeping batches on disk and retrying",
                        out.kind,
                        out.detail,
                    )
                    with self._lock:
                        self._offline = True
                        self._spill()
                    self._notify()
                    wait = backoff.next()
                    if out.retry_after is not None:
                        wait = min(out.retry_after, self.config.max_retry_after_s)
                    elif self._closing:
                        wait = min(wait, _CLOSING_RETRY_S)
                    self._nudge.wait(wait)
                    self._nudge.clear()
                else:
                    self.once(
                        out.kind, "service refused a batch: %s %s; dropped", out.kind, out.detail
                    )
                    self._done(rec)
            except Exception as exc:  # keep the thread alive whatever happens
                self.once("sender", "sender error: %r", exc)
                self._post_stop.wait(self.config.backoff_initial_s)

    # -- close -----------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Wait up to 80 % of ``timeout`` for the service to take every point, then spool
        the rest; what is left undelivered is logged as a warning and kept in ``undelivered``.
        """
        if self._closed or os.getpid() != self._pid:
            return
        timeout = self._close_timeout if timeout is None else max(0.0, timeout)
        deadline = _time.monotonic() + timeout
        try:
            # Waiting for the disk is not enough: what stays in the spool reaches the
            # service only through ``logitwatch sync`` or a later run.
            self._closing = True
            self._nudge.set()  # a poster in a long backoff looks for the service now
            target = self._logged_rows
            self._wake.set()
            with self._progress:
                self._progress.wait_for(
                    lambda: self._taken_rows >= target and self._settled(), 0.8 * timeout
                )
        except Exception as exc:
            self.once("close", "closing the sink failed: %r", exc)
        super().close(max(0.0, deadline - _time.monotonic()))
        if self.undelivered is not None:
            log.warning("%s", self.undelivered.message)

    def _settled(self) -> bool:
        """Everything routed has reached the service (not only the disk)."""
        return not self._outbox and (self.spool is None or self.spool.pending() == 0)

    def _finish(self, deadline: float) -> None:
        with self._lock:
            self._spill()  # whatever is still in memory (even in flight) goes to disk
            lost = len(self._outbox)
            if lost:
                self.once("lost", "%d batches could not be delivered or spooled", lost)
        self._post_stop.set()
        self._post_wake.set()
        self._nudge.set()
        self._poster_thread.join(max(0.0, deadline - _time.monotonic()))
        try:
            self.undelivered = self._count_undelivered(lost)
        except Exception as exc:
            self.once("count", "could not count the undelivered points: %r", exc)
        with self._lock:
            if self.spool is not None:
                self.spool.close()
        self._poster.close()

    def _count_undelivered(self, lost: int) -> Undelivered | None:
        """Read the spool back: the steps, points and batches still waiting in it."""
        steps: set[int] = set()
        points = batches = 0
        complete = True
        if self.spool is not None and self.spool.pending() > 0:
            stop = _time.monotonic() + _COUNT_BUDGET_S
            for rec in self.spool.unacked():
                if rec.kind != BATCH:
                    continue
                batches += 1
                if not complete or _time.monotonic() > stop:
                    complete = False  # a huge spool: count its batches, not its steps
                    continue
                try:
                    batch = decode_batch(rec.data)
                except ProtocolError:
                    continue
                points += batch.n_points
                for series in batch.series:
                    steps.update(series.steps)
        if not batches and not lost:
            return None
        return Undelivered(
            run=self.run,
            server=self._poster.server,
            spool_dir=self.spool_dir.resolve(),
            steps=len(steps),
            first_step=min(steps) if steps else None,
            last_step=max(steps) if steps else None,
            points=points,
            batches=batches,
            lost_batches=lost,
            complete=complete,
            token=self._has_token,
        )
