"""The TensorBoard sink: every probe as a scalar in an event file, each alert as a text entry.

Written with tensorboard's own protos and record framing, one event per step holding every
series, on the sink's thread; ``torch.utils.tensorboard`` would pay one event per scalar.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import time as _time
from pathlib import Path
from typing import Any

from logitwatch.agent.transport.forward import ForwardingSink, alert_text

__all__ = ["TensorBoardSink"]

_uid = itertools.count()


def _crc32c():
    """A C crc32c when one is installed (google-crc32c); else tensorboard's pure Python one."""
    try:
        import google_crc32c

        return google_crc32c.value
    except ImportError:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c

        return crc32c


class TensorBoardSink(ForwardingSink):
    """Forward a Monitor's series, and its alerts, to a TensorBoard log directory.

    >>> monitor = Monitor(model, opt, run="my-run", server=URL,  # doctest: +SKIP
    ...                   also=[TensorBoardSink("runs/my-run")])

    Tags are ``logitwatch/attn.logit_max/layer0/head3``; each step is one event at the
    training step, with the time the step was reported. Alerts are text under
    ``logitwatch/alerts`` at the alert's first step; the run's configuration is text under
    ``logitwatch/config``. The event file is created at the first write (a rank that never
    reports leaves none) and named ``events.out.tfevents.*.logitwatch``, so it sits beside
    the training script's own SummaryWriter files in the same directory. Values are float32,
    as TensorBoard's scalars are.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        prefix: str = "logitwatch",
        alerts: bool = True,
        interval: float = 1.0,
        max_queue_mb: float = 32.0,
        close_timeout: float = 10.0,
    ) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2
            from tensorboard.compat.proto import tensor_shape_pb2 as shape_pb2
        except ImportError as exc:
            raise ImportError(
                "TensorBoardSink needs tensorboard: pip install 'logitwatch[tensorboard]'"
            ) from exc
        self._pb = (event_pb2, summary_pb2, tensor_pb2, shape_pb2)
        self.logdir = Path(logdir)
        self.path: Path | None = None  # the event file, once written
        self._file = None
        self._crc = _crc32c()
        super().__init__(
            prefix=prefix,
            interval=interval,
            max_queue_mb=max_queue_mb,
            close_timeout=close_timeout,
            alerts=alerts,
            name="logitwatch-tensorboard",
        )

    # -- event file ------------------------------------------------------------------------
    def _masked(self, data: bytes) -> bytes:
        x = self._crc(data) & 0xFFFFFFFF
        return struct.pack("<I", (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    def _write_event(self, event) -> None:
        if self._file is None:
            self.logdir.mkdir(parents=True, exist_ok=True)
            name = (
                f"events.out.tfevents.{int(_time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_uid)}.logitwatch"
            )
            self.path = self.logdir / name
            self._file = open(self.path, "wb")  # noqa: SIM115 - held open until close
            first = self._pb[0].Event(wall_time=_time.time(), file_version="brain.Event:2")
            self._write_record(first.SerializeToString())
        self._write_record(event.SerializeToString())

    def _write_record(self, data: bytes) -> None:
        # TFRecord framing: length, its masked crc32c, the bytes, their masked crc32c.
        head = struct.pack("<Q", len(data))
        self._file.write(head + self._masked(head) + data + self._masked(data))

    def _text(self, tag: str, step: int, text: str) -> None:
        event_pb2, summary_pb2, tensor_pb2, shape_pb2 = self._pb
        meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
        )
        tensor = tensor_pb2.TensorProto(
            dtype="DT_STRING",
            string_val=[text.encode()],
            tensor_shape=shape_pb2.TensorShapeProto(dim=[shape_pb2.TensorShapeProto.Dim(size=1)]),
        )
        value = summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)
        self._write_event(
            event_pb2.Event(
                wall_time=_time.time(), step=step, summary=summary_pb2.Summary(value=[value])
            )
        )

    # -- hooks (writer thread) ---------------------------------------------------------------
    def _write_step(self, step: int, time: float, values: dict[str, float]) -> None:
        event_pb2, summary_pb2, _, _ = self._pb
        value = summary_pb2.Summary.Value
        summary = summary_pb2.Summary(
            value=[value(tag=tag, simple_value=v) for tag, v in values.items()]
        )
        self._write_event(event_pb2.Event(wall_time=time, step=step, summary=summary))

    def _write_alert(self, alert: dict[str, Any]) -> None:
        step = alert.get("first_step")
        self._text(
            self._tag("alerts"), int(step) if isinstance(step, int) else 0, alert_text(alert)
        )

    def _write_run(self, run: str, info: dict[str, Any]) -> None:
        body = json.dumps({"run": run, **info}, indent=2, default=str)
        self._text(self._tag("config"), 0, "```\n" + body + "\n```")

    def _tag(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _flush_tool(self) -> None:
        if self._file is not None:
            self._file.flush()  # TensorBoard sees each interval's steps as they are written

    def _close_tool(self) -> None:
        if self._file is not None:
            self._file.close()
