"""The one collective of a reporting step under torch.distributed: every rank's values, and
rank 0's decisions that every rank then takes at the same step."""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from logitwatch.agent.monitoring.actions import SEVERITY_RANK
from logitwatch.agent.monitoring.config import PROBES
from logitwatch.agent.monitoring.reduce import DEN, Plan, combine, make_plan
from logitwatch.agent.probes.reductions import Slots
from logitwatch.agent.transport.sink import SeriesKey

__all__ = ["MAX_ALERTS", "Decisions", "RankSync", "Shipment", "dist_rank_world", "write_host"]

log = logging.getLogger("logitwatch.agent")

#: Alerts rank 0 hands on per reporting step; more wait for the next one, most severe first.
MAX_ALERTS = 8
_RULE_BYTES = 24  # of an alert's rule name, 6 bytes per float64 (exact below 2**53)
_ALERT = 3 + _RULE_BYTES // 6  # severity, first step, fired step, rule name
# Header: body length, layout checksum (two 16-bit halves), a flag per probe kind that is
# off, the number of alerts, the alerts.
_NEED, _CRC, _OFF = 0, 1, 3
_ALERTS = _OFF + len(PROBES)
HEADER = _ALERTS + 1 + MAX_ALERTS * _ALERT
_SEVERITIES = {v: k for k, v in SEVERITY_RANK.items()}


def dist_rank_world() -> tuple[int, int]:
    """(rank, number of ranks) of torch.distributed's default group; (0, 1) when it is not
    initialised: then the Monitor does no collective at all."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Decisions:
    """What every rank does after a reporting step, read from the gathered header."""

    off: set[str] = field(default_factory=set)  # probe kinds some rank switched off
    alerts: list[dict[str, Any]] = field(default_factory=list)  # rank 0's, to act on


@dataclass
class Shipment:
    """A reporting rank's reduced values, for the Reporter (duck-typed as Slots). ``check``:
    the slot that is 1 when the step holds (the ranks' layouts agreed), and per block the
    slot that is 1 when the block does (a norm needs every rank's share)."""

    buf: torch.Tensor
    used: int
    device: torch.device
    blocks: list[tuple[int, tuple[SeriesKey, ...]]]
    check: tuple[int, list[int]]


def write_host(slots: Slots, host: Mapping[SeriesKey, float]) -> dict[SeriesKey, float]:
    """Move the host-side values (loss given as a number, throughput) into ``slots`` so they
    travel with the rest; returns those that need no other rank's (the LR: equal everywhere)."""
    keep = {k: v for k, v in host.items() if k[0] == "lr"}
    keys = tuple(k for k in host if k not in keep)
    if keys:
        values = torch.tensor([float(host[k]) for k in keys], dtype=torch.float32)
        if slots.device.type == "cuda":  # an async copy needs page-locked memory
            values = values.pin_memory()
        slots.write(("host", keys), keys, values)
    return keep


def _encode(alerts: Sequence[Mapping[str, Any]]) -> list[float]:
    out = [float(len(alerts))]
    for a in alerts:
        step, fired = a.get("first_step"), a.get("fired_step")
        rule = str(a.get("rule", "")).encode()[:_RULE_BYTES].ljust(_RULE_BYTES, b"\0")
        out += [
            float(SEVERITY_RANK.get(str(a.get("severity")), 0)),
            float(step) if isinstance(step, int) else math.nan,
            float(fired) if isinstance(fired, int) else math.nan,
        ]
        out += [float(int.from_bytes(rule[i : i + 6], "big")) for i in range(0, _RULE_BYTES, 6)]
    return out + [0.0] * (HEADER - _ALERTS - len(out))


def _decode(values: Sequence[float]) -> list[dict[str, Any]]:
    """Rank 0's alerts as the other ranks see them: severity, first and fired step, rule name."""
    alerts = []
    for i in range(int(values[0])):
        a = values[1 + i * _ALERT : 1 + (i + 1) * _ALERT]
        raw = b"".join(int(x).to_bytes(6, "big") for x in a[3:])
        rule = raw.rstrip(b"\0").decode("utf-8", "replace")
        step = int(a[1]) if math.isfinite(a[1]) else None
        fired = int(a[2]) if math.isfinite(a[2]) else step
        alerts.append(
            {
                "id": f"rank0:{rule}:{step}",
                "rule": rule,
                "severity": _SEVERITIES.get(int(a[0]), "info"),
                "first_step": step,
                "fired_step": fired,
                "labels": {},
                "source": "rank 0",
            }
        )
    return alerts


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class RankSync:
    """Runs the reporting collective of one Monitor; every rank calls ``exchange`` at the same
    steps (the reporting steps) and nowhere else, so collectives match by construction.

    Each rank packs one float64 row: a header (its layout checksum, the probe kinds it switched
    off, and on rank 0 the alerts every rank acts on), a written flag per block, and its values.
    One ``all_gather`` gives every rank every row; each reduces them on the device
    (``reduce.py``) and reads the header, so that all ranks take the same decisions.

    ``exchange`` never raises: whatever fails locally, the rank still sends its row (marked
    unusable), so that no rank waits for another. On an accelerator the header is read one
    reporting step later, when its copy to the host has long finished: the training thread
    never waits for the device.
    """

    def __init__(
        self, *, per_rank: bool, reports: bool, device: torch.device, group: Any = None
    ) -> None:
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.per_rank, self.reports = per_rank, reports
        backend = str(dist.get_backend(group))
        if backend == "gloo":
            device = torch.device("cpu")
        elif backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device  # a multi-device backend ("cpu:gloo,cuda:nccl") takes either
        self.defer = device.type != "cpu"
        self.capacity = 0  # body slots per row: the same on every rank, grown together
        self.collectives = 0  # all_gathers issued: one per reporting step
        self.dropped = 0  # reports lost to a layout change or a capacity too small
        self.broken = False
        self._warned: set[str] = set()
        self._layout_key: tuple | None = None
        self._layout: list[tuple[Any, tuple[int, tuple[SeriesKey, ...]]]] = []
        self._crc = (0.0, 0.0)
        self._plan: Plan | None = None
        self._resets = 0
        self._pending: tuple[torch.Tensor, Any, list] | None = None
        self._summary_host: torch.Tensor | None = None

    def plan_capacity(self, layers: int) -> None:
        """Size the rows for a model of ``layers`` layers before the first exchange (from the
        model's structure, so that every rank picks the same size); a report that needs more
        is dropped once and every rank grows together."""
        if self.collectives == 0:
            self.capacity = max(self.capacity, _pow2(256 + 96 * max(layers, 1)))

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("logitwatch: " + msg, *args)

    # -- the layout -------------------------------------------------------------------------

    def _refresh(self, slots: Slots) -> None:
        key = (slots.used, len(slots.blocks), self._resets)
        if key == self._layout_key:
            return
        self._layout = sorted(slots.blocks.items(), key=lambda kv: kv[1][0])
        blocks = [block for _, block in self._layout]
        # per_rank labels differ by rank; the layout checksum must not.
        text = repr([(s, [(m, [lb for lb in labels if lb[0] != "rank"]) for m, labels in keys])
                     for s, keys in blocks] + [slots.used])  # fmt: skip
        crc = zlib.crc32(text.encode())
        self._crc = (float(crc >> 16), float(crc & 0xFFFF))
        self._plan = make_plan(blocks, slots.used, self.per_rank, self.device)
        self._layout_key = key

    # -- the collective ---------------------------------------------------------------------

    def exchange(
        self, slots: Slots, off: set[str], alerts: list[dict[str, Any]]
    ) -> tuple[Shipment | None, Decisions | None]:
        """The reporting step's collective: send this rank's values and (rank 0) ``alerts``.

        Returns what this rank reports (None on a non-reporting rank) and the decisions ready
        now: this step's on the CPU, the previous report's on an accelerator.
        """
        if self.broken:
            return None, None
        decided = None
        if self.defer and self._pending is not None:
            decided = self._read(slots, *self._pending)
            self._pending = None
        L = HEADER + self.capacity
        wire, written = None, []
        try:
            written = slots.take()  # first: probes that defer their writes make them here
            self._refresh(slots)
            wire, n, fits = self._pack(slots, off, alerts, L, written)
        except Exception as e:
            self._warn("pack", "could not pack a report (%s: %s)", type(e).__name__, e)
            n, fits = 0, False
        if wire is None:  # still take part, with a row that marks this rank's values unusable
            wire = torch.zeros(L, dtype=torch.float64, device=self.device)
            wire[_NEED] = -1.0
        gathered = torch.empty(self.world * L, dtype=torch.float64, device=self.device)
        try:
            self.dist.all_gather_into_tensor(gathered, wire, group=self.group)
            self.collectives += 1
        except Exception as e:  # the process group is gone: every rank sees it fail
            self.broken = True
            self._warn("gather", "the reporting collective failed (%s: %s); monitoring of "
                       "this rank stops", type(e).__name__, e)  # fmt: skip
            return None, decided
        rows = gathered.view(self.world, L)
        summary = self._summary(rows)
        shipped = None
        if self.reports and fits:
            try:
                shipped = self._reduce(rows, summary, written, n)
            except Exception as e:
                self._warn("reduce", "could not reduce a report (%s: %s)", type(e).__name__, e)
        if self.defer:
            event = None
            if summary.device.type == "cuda":
                if self._summary_host is None:
                    self._summary_host = torch.empty(summary.numel(), dtype=torch.float64)
                    self._summary_host = self._summary_host.pin_memory()
                self._summary_host.copy_(summary, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            host = self._summary_host if event is not None else summary.clone()
            self._pending = (host, event, alerts)
        else:
            decided = self._read(slots, summary, None, alerts)
        return shipped, decided

    def _pack(
        self, slots: Slots, off: set[str], alerts: list[dict[str, Any]], L: int, written: list
    ) -> tuple[torch.Tensor, int, bool]:
        n, nb = slots.used, len(self._layout)
        need = n + nb
        fits = need <= self.capacity
        head = [float(need), *self._crc, *(float(kind in off) for kind in PROBES)]
        head += _encode(alerts)
        if fits:
            starts = {start for start, _ in written}
            head += [float(start in starts) for _, (start, _) in self._layout]
        host = torch.tensor(head, dtype=torch.float64)
        wire = torch.zeros(L, dtype=torch.float64, device=self.device)
        if self.device.type == "cuda":
            host = host.pin_memory()
        wire[: host.numel()].copy_(host, non_blocking=True)
        if fits and n:
            wire[HEADER + nb : HEADER + need].copy_(slots.buf[:n], non_blocking=True)
        return wire, n, fits

    def _summary(self, rows: torch.Tensor) -> torch.Tensor:
        """[layouts agree, rows fit, the largest need, a flag per probe kind off anywhere,
        rank 0's alerts], computed on the device."""
        need = rows[:, _NEED]
        crc = rows[:, _CRC : _CRC + 2]
        agree = (crc == crc[0]).all() & (need == need[0]).all() & (need[0] >= 0)
        fits = need.amax() <= self.capacity
        flags = torch.stack([agree, fits]).to(torch.float64)
        off = rows[:, _OFF:_ALERTS].amax(0)
        return torch.cat([flags, need.amax().reshape(1), off, rows[0, _ALERTS:HEADER]])

    def _reduce(self, rows, summary, written, n) -> Shipment:
        nb = len(self._layout)
        flags = rows[:, HEADER : HEADER + nb]
        values = rows[:, HEADER + nb : HEADER + nb + n]
        out = combine(flags, values, self._plan, self.rank)
        ok = summary[0] * summary[1]
        # A probe that failed on one rank leaves its norms without that rank's share: such
        # a block is left out (the probe is off everywhere from the next report on).
        whole = (flags > 0).all(0) | ~self._plan.whole
        buf = torch.cat([out, ok.reshape(1), whole.to(out.dtype)]).float()  # the Reporter's
        index = {start: i for i, (_, (start, _)) in enumerate(self._layout)}
        # Denominators of ratios served their purpose in ``combine``.
        blocks = [b for b in written if not b[1][0][0].startswith(DEN)]
        check = (n, [n + 1 + index[b[0]] for b in blocks])
        return Shipment(buf, n + 1 + nb, buf.device, blocks, check)

    def _read(self, slots: Slots, summary, event, alerts) -> Decisions:
        """Act on a gathered header: the same numbers on every rank give the same decisions."""
        if event is not None:
            event.synchronize()  # long done: it was started a reporting step ago
        s = summary.tolist()
        agree, fits, need = s[0] > 0, s[1] > 0, int(s[2])
        if not agree:
            # A probe failed on one rank before it laid out its block: lay everything out
            # afresh on every rank (the failed probe is off everywhere by now).
            self.dropped += 1
            self._warn("layout", "the ranks' reports differ in layout (a probe failed on some "
                       "rank, or the ranks run different models); dropped a report")  # fmt: skip
            slots.reset()
            self._resets += 1
        elif not fits:
            self.dropped += 1
            self.capacity = _pow2(need)
        elif need > 0:  # rows only as long as reports need, with room to grow: less to gather
            self.capacity = min(self.capacity, _pow2(2 * need))
        off = {kind for kind, flag in zip(PROBES, s[3 : 3 + len(PROBES)], strict=True) if flag}
        mine = self.rank == 0
        return Decisions(off, list(alerts) if mine else _decode(s[3 + len(PROBES) :]))
