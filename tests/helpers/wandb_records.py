"""Read an offline W&B run back from its ``.wandb`` file: history rows, summary, alerts, config.

wandb (0.31) writes no ``wandb-summary.json`` offline and ships no Python reader of the
``.wandb`` file; the file is its transaction log: a 7-byte header (``:W&B``, magic 0xBEE1,
version 0), then LevelDB-log framing (32 KiB blocks; records of crc32, length, type
full/first/middle/last) around ``wandb_internal_pb2.Record`` protobufs. Checksums are verified,
so a change of format fails loudly instead of reading garbage. ``run.finish()`` can return
before wandb's service process has flushed the file (seen: 7 bytes, then the whole run half a
second later), so the reader waits for the run's ``exit`` record.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["WandbRun", "read_offline_run"]

_BLOCK = 32768
_HEADER = struct.Struct("<IHB")  # crc32 (seeded with the type byte), length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class WandbRun:
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per history row
    summary: dict[str, Any] = field(default_factory=dict)  # the last value of every key
    alerts: list[dict[str, Any]] = field(default_factory=list)  # title, text, level
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # define_metric records


def _records(data: bytes) -> list[bytes]:
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    out, pending, pos = [], b"", 7
    while pos + _HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER.size:  # block trailer: zero padding
            pos += left
            continue
        crc, length, kind = _HEADER.unpack_from(data, pos)
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        if pos + _HEADER.size + length > len(data):
            break  # still being written
        body = data[pos + _HEADER.size : pos + _HEADER.size + length]
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, pos
        pos += _HEADER.size + length
        if kind == _FULL:
            out.append(body)
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            out.append(pending + body)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _finished(path: Path, timeout: float) -> list:
    """The file's records, once its last one is the run's ``exit`` (a finished run)."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        recs = []
        for raw in _records(path.read_bytes()):
            rec = pb.Record()
            rec.ParseFromString(raw)
            recs.append(rec)
        if recs and recs[-1].WhichOneof("record_type") == "exit":
            return recs
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.1)


def read_offline_run(run_dir: str | Path, timeout: float = 30.0) -> WandbRun:
    """``run_dir``: the offline run's directory (``.../wandb/offline-run-*``), after finish()."""
    (path,) = Path(run_dir).glob("*.wandb")
    run = WandbRun()
    for rec in _finished(path, timeout):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for u in rec.summary.update:
                run.summary[_key(u)] = json.loads(u.value_json)
        elif kind == "alert":
            a = rec.alert
            run.alerts.append({"title": a.title, "text": a.text, "level": a.level})
        elif kind == "config":
            for u in rec.config.update:
                run.config[_key(u)] = json.loads(u.value_json)
        elif kind == "metric":
            m = rec.metric
            run.metrics.append({"name": m.name, "glob": m.glob_name, "step": m.step_metric})
    return run
