"""The offline sink: a run's batches as JSON lines in ``<directory>/<run>.jsonl``.

Line 1 names the run and the writing client; then one line per run registration
(``{"run", "config", "tags"}``) and one per batch, in the protocol's JSON form (so NaN and
±Inf survive). ``logitwatch sync DIR --server URL`` uploads it; each batch keeps its
(client, seq), so syncing twice stores every point once.
"""

from __future__ import annotations

import json
import time as _time
from pathlib import Path

from logitwatch.agent.transport.batcher import BatchingSink
from logitwatch.protocol import Batch, encode_batch

__all__ = ["FileSink"]


class FileSink(BatchingSink):
    """Writes what a Monitor reports to a JSON-lines file, for runs without a service.

    >>> import tempfile
    >>> sink = FileSink(tempfile.mkdtemp(), "offline-run")
    >>> sink.log(0, {("loss", ()): 2.5}); sink.close(timeout=5)
    >>> sink.path.read_text().count("\\n")
    2
    """

    def __init__(self, directory: str | Path, run: str, *, interval: float = 1.0) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}.")
        super().__init__(
            run,
            interval=interval,
            max_points_per_batch=50_000,
            max_queue_bytes=32 * 2**20,
            close_timeout=10.0,
            name=f"logitwatch-filesink-{run}",
        )
        self.directory = Path(directory)
        self.path = self.directory / f"{run}.jsonl"
        self._file = None
        self._start()

    def _open(self):
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - held open until close()
            header = {"run": self.run, "client": self.client, "created": _time.time()}
            self._file.write(json.dumps(header).encode() + b"\n")
        return self._file

    def _write(self, line: bytes) -> None:
        try:
            f = self._open()
            f.write(line + b"\n")
            f.flush()  # a whole line reaches the OS at once: a crash cuts at most the last one
        except OSError as exc:
            self.once("file write", "cannot write %s (%s): dropping points", self.path, exc)

    def _emit_batch(self, batch: Batch) -> None:
        self._write(encode_batch(batch, fmt="json"))

    def _emit_run(self, entry) -> None:
        body = {"run": self.run, "config": entry.config, "tags": entry.tags}
        self._write(json.dumps(body, default=str).encode())

    def _finish(self, deadline: float) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self.once("file close", "cannot close %s: %s", self.path, exc)
