"""``logitwatch sync DIR --server URL``: upload a spool directory or a FileSink's JSON lines.

Batches keep their (client, seq), so an upload that is interrupted and run again, or a
spool that the training process had partly sent, stores every point once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from logitwatch.agent.transport.poster import Backoff, Poster
from logitwatch.agent.transport.spool import BATCH, RUN, Spool, SpoolBusy, read_state
from logitwatch.protocol import ProtocolError, decode_batch, encode_batch

__all__ = ["add_arguments", "find_sources", "run", "sync_jsonl", "sync_spool"]

log = logging.getLogger("logitwatch.agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir",
        help="a spool directory (./.logitwatch/spool/<run> or its parent) or a FileSink "
        "directory or .jsonl file",
    )
    parser.add_argument("--server", required=True, help="service URL, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--token", default=os.environ.get("LOGITWATCH_TOKEN"), help="API token (ingest scope)"
    )
    parser.add_argument("--run", default=None, help="upload under this run name instead")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="give up when the service stays unreachable this many seconds (default 60)",
    )


class _Uploader:
    """Sends records in order; waits out outages up to ``timeout`` seconds at a time."""

    def __init__(self, server: str, run: str, token: str | None, timeout: float) -> None:
        self.poster = Poster(server, run, token=token)
        self.timeout = timeout
        self.sent = self.duplicates = self.points = self.refused = 0

    def send(self, kind: bytes, data: bytes, n_points: int = 0) -> None:
        backoff = Backoff(0.2, 5.0)
        deadline = time.monotonic() + self.timeout
        while True:
            out = self.poster.send(kind, data)
            if out.ok:
                if kind == BATCH:
                    self.sent += 1
                    self.points += n_points
                    self.duplicates += bool(out.answer.get("duplicate"))
                return
            if out.kind in ("http 401", "http 403"):
                raise PermissionError(
                    f"{self.poster.server}: {out.kind}: {out.detail} (check --token)"
                )
            if not out.retry:
                self.refused += 1
                print(
                    f"logitwatch: warning: the service refused a batch: {out.kind} {out.detail}",
                    file=sys.stderr,
                )
                return
            wait = out.retry_after if out.retry_after is not None else backoff.next()
            if time.monotonic() + wait > deadline:
                raise ConnectionError(f"{self.poster.server}: {out.kind} ({out.detail})")
            time.sleep(wait)


def _n_points(data: bytes) -> int:
    try:
        return decode_batch(data).n_points
    except ProtocolError:
        return 0


def sync_spool(directory: Path, uploader_for, run: str | None = None) -> _Uploader:
    try:
        spool = Spool(directory)
    except SpoolBusy:
        raise ValueError(f"{directory}: the spool is in use by a running process") from None
    with spool:
        name = run or read_state(directory).get("run") or directory.name
        up = uploader_for(name)
        while (rec := spool.peek()) is not None:
            up.send(rec.kind, rec.data, _n_points(rec.data) if rec.kind == BATCH else 0)
            spool.ack(rec)
    return up


def sync_jsonl(path: Path, uploader_for, run: str | None = None) -> _Uploader:
    up = None
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                obj = json.loads(line)
            except ValueError:
                log.warning("%s:%d: damaged line (a crash mid-write?); skipped", path, lineno)
                continue
            if up is None:
                up = uploader_for(run or obj.get("run") or path.stem)
            if "series" in obj:
                try:
                    batch = decode_batch(line, "application/json")
                except ProtocolError as exc:
                    log.warning("%s:%d: not a valid batch (%s); skipped", path, lineno, exc)
                    continue
                up.send(BATCH, encode_batch(batch), batch.n_points)
            elif "config" in obj or "tags" in obj:
                body = {"config": obj.get("config") or {}, "tags": obj.get("tags") or {}}
                up.send(RUN, json.dumps(body).encode())
    return up or uploader_for(run or path.stem)


def find_sources(root: Path) -> Iterator[tuple[str, Path]]:
    """("spool" | "jsonl", path) for everything under ``root`` worth uploading."""
    if root.is_file():
        yield "jsonl", root
        return
    if not root.is_dir():
        raise ValueError(f"{root}: no such file or directory")
    if any(root.glob("*.spool")):
        yield "spool", root
    for p in sorted(root.glob("*.jsonl")):
        yield "jsonl", p
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if any(sub.glob("*.spool")):
            yield "spool", sub


def run(args: argparse.Namespace) -> int:
    if not args.server.startswith(("http://", "https://")):
        raise ValueError(f"--server must be an http(s) URL, not {args.server!r}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    sources = list(find_sources(Path(args.dir)))
    if not sources:
        raise ValueError(f"{args.dir}: no spool files (*.spool) or .jsonl files found")

    def uploader_for(name: str) -> _Uploader:
        return _Uploader(args.server, name, args.token, args.timeout)

    status = 0
    for kind, path in sources:
        try:
            fn = sync_spool if kind == "spool" else sync_jsonl
            up = fn(path, uploader_for, args.run)
        except ConnectionError as exc:
            print(f"logitwatch: error: {path}: service unreachable: {exc}", file=sys.stderr)
            return 1
        except PermissionError as exc:
            print(f"logitwatch: error: {path}: not allowed: {exc}", file=sys.stderr)
            return 1
        print(
            f"{path}: run {up.poster.run}: {up.sent} batches, {up.points} points sent"
            f" ({up.duplicates} batches were already stored)"
            + (f", {up.refused} refused" if up.refused else "")
        )
        up.poster.close()
        status = status or (1 if up.refused else 0)
    return status
