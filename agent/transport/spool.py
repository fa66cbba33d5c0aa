"""The agent's disk spool: an append-only FIFO of encoded records, replayed in order.

Files ``000001.spool``, ``000002.spool``, ... hold records ``magic | length | crc32 | payload``;
``cursor.json`` says how far replay got. A record cut short by a crash fails its length or
checksum and the rest of that file is skipped with one warning. One process owns a spool
directory at a time (an advisory lock), so two writers never interleave records.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Spool", "SpoolBusy", "SpoolRecord", "default_spool_dir", "read_state", "write_state"]

log = logging.getLogger("logitwatch.agent")

_MAGIC = b"LW"
_HEADER = struct.Struct("<2sII")  # magic, payload length, crc32 of payload
_SUFFIX = ".spool"
MAX_RECORD_BYTES = 256 * 1024 * 1024  # a length beyond this is corruption, not a record

#: Record kinds: an encoded points batch (msgpack) and a run registration (JSON).
BATCH = b"B"
RUN = b"R"


class SpoolBusy(RuntimeError):
    """Another process holds this spool directory."""


def default_spool_dir(run: str) -> Path:
    """``./.logitwatch/spool/<run>/``, relative to the training script's working directory."""
    return Path.cwd() / ".logitwatch" / "spool" / run


@dataclass(slots=True)
class SpoolRecord:
    kind: bytes  # BATCH or RUN
    data: bytes
    position: tuple[int, int] = (0, 0)  # (file number, offset just past the record)


def read_state(directory: Path) -> dict[str, Any]:
    """The run's local progress (``max_segment``, ``last_step``) or {} when unknown."""
    try:
        state = json.loads((Path(directory) / "state.json").read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def write_state(directory: Path, state: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".state.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, directory / "state.json")  # atomic: a reader sees old or new, never half


class Spool:
    """A directory of spool files; ``append`` at the tail, ``peek``/``ack`` at the head.

    >>> import tempfile
    >>> s = Spool(tempfile.mkdtemp())
    >>> s.append(BATCH, b"payload"); s.peek().data, s.pending()
    (b'payload', 1)

    Thread-safe: the sender's threads share one instance. Raises OSError from ``append``
    when the disk refuses (full, read-only); callers decide what to log.
    """

    def __init__(self, directory: str | Path, *, file_bytes: int = 16 * 1024 * 1024) -> None:
        self.directory = Path(directory)
        self.file_bytes = file_bytes
        self._lock = threading.RLock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise SpoolBusy(f"spool {self.directory} is in use by another process") from None
        cursor = self._read_cursor()
        self._files = sorted(
            int(p.stem) for p in self.directory.glob(f"*{_SUFFIX}") if p.stem.isdigit()
        )
        self._head = (cursor["file"], cursor["offset"])  # next record to deliver
        self._bad_files: set[int] = set()
        # Records an earlier process left undelivered: counted by scanning its files once.
        self._pending = sum(
            sum(1 for _ in self._scan(n, self._head[1] if n == self._head[0] else 0))
            for n in self._files
            if n >= self._head[0]
        )
        self._next_no = max([*self._files, self._head[0]]) + 1
        self._write_no: int | None = None
        self._write_fd = -1
        self._write_size = 0
        self._closed = False
        self._drop_done_files()

    # -- tail --------------------------------------------------------------------------
    def append(self, kind: bytes, data: bytes) -> None:
        record = _HEADER.pack(_MAGIC, len(data) + 1, zlib.crc32(kind + data)) + kind + data
        with self._lock:
            if self._closed:
                raise OSError("spool is closed")
            if self._write_no is None or self._write_size >= self.file_bytes:
                self._open_next()
            try:
                _write_all(self._write_fd, record)
            except OSError:
                # A half-written record would hide every record after it: cut it off.
                try:
                    os.ftruncate(self._write_fd, self._write_size)
                except OSError:
                    self._close_writer()  # start a fresh file next time
                raise
            self._write_size += len(record)
            self._pending += 1

    # -- head --------------------------------------------------------------------------
    def pending(self) -> int:
        """Records appended (now or by an earlier process) and not yet acknowledged."""
        with self._lock:
            return self._pending

    def peek(self) -> SpoolRecord | None:
        """The oldest unacknowledged record, or None."""
        with self._lock:
            while self._pending > 0 and not self._closed:
                no, off = self._head
                if no in self._files:
                    for rec in self._scan(no, off, limit=1):
                        return rec
                    if no == self._write_no:
                        break  # read up to what this process wrote: nothing more
                later = [n for n in self._files if n > no]
                if not later:
                    break
                self._head = (later[0], 0)
            self._pending = 0  # the count was off by a skipped tail: trust the files
            return None

    def unacked(self) -> Iterator[SpoolRecord]:
        """The records not yet acknowledged, oldest first; nothing is acknowledged."""
        with self._lock:
            head_no, head_off = self._head
            files = [n for n in self._files if n >= head_no]
        for no in files:  # the files are append-only: read them without holding the lock
            yield from self._scan(no, head_off if no == head_no else 0)

    def ack(self, record: SpoolRecord) -> None:
        """Mark ``record`` (from ``peek``) delivered."""
        with self._lock:
            if self._closed or record.position <= self._head:
                return
            self._head = record.position
            self._pending = max(0, self._pending - 1)
            self._write_cursor()
            self._drop_done_files()

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_writer()
            try:
                self._write_cursor()
            except OSError:
                pass
            os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------
    def _path(self, no: int) -> Path:
        return self.directory / f"{no:06d}{_SUFFIX}"

    def _active_no(self) -> int | None:
        return self._write_no

    def _open_next(self) -> None:
        self._close_writer()
        no = self._next_no
        self._next_no += 1
        self._write_fd = os.open(self._path(no), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._write_no = no
        self._write_size = os.fstat(self._write_fd).st_size
        self._files.append(no)
        if self._pending == 0:
            self._head = (no, self._write_size)

    def _close_writer(self) -> None:
        if self._write_no is not None:
            try:
                os.close(self._write_fd)
            except OSError:
                pass
            self._write_no = None

    def _scan(self, no: int, offset: int, limit: int | None = None):
        """Yield the well-formed records of file ``no`` from ``offset``; warn on a bad tail."""
        path = self._path(no)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                count = 0
                while limit is None or count < limit:
                    head = f.read(_HEADER.size)
                    if not head:
                        return
                    bad = len(head) < _HEADER.size
                    if not bad:
                        magic, length, crc = _HEADER.unpack(head)
                        bad = magic != _MAGIC or not 1 <= length <= MAX_RECORD_BYTES
                    if not bad:
                        body = f.read(length)
                        bad = len(body) < length or zlib.crc32(body) != crc
                    if bad:
                        if no not in self._bad_files:
                            self._bad_files.add(no)
                            log.warning(
                                "spool %s: damaged or truncated record at byte %d "
                                "(a crash mid-write?); skipping the rest of that file",
                                path,
                                offset,
                            )
                        return
                    offset += _HEADER.size + length
                    count += 1
                    yield SpoolRecord(body[:1], body[1:], (no, offset))
        except FileNotFoundError:
            return

    def _drop_done_files(self) -> None:
        """Delete files whose every record has been delivered (never the one being written)."""
        for no in list(self._files):
            if no >= self._head[0] or no == self._active_no():
                break
            try:
                self._path(no).unlink()
            except FileNotFoundError:
                pass
            self._files.remove(no)

    def _read_cursor(self) -> dict[str, int]:
        try:
            c = json.loads((self.directory / "cursor.json").read_text())
            return {"file": int(c["file"]), "offset": int(c["offset"])}
        except (OSError, ValueError, KeyError, TypeError):
            return {"file": 0, "offset": 0}

    def _write_cursor(self) -> None:
        tmp = self.directory / ".cursor.tmp"
        tmp.write_text(json.dumps({"file": self._head[0], "offset": self._head[1]}))
        os.replace(tmp, self.directory / "cursor.json")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
