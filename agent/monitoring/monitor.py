"""The Monitor: probes on a model and its optimizer, reported to a sink every ``every`` steps.

It never raises into training and never synchronises with the device between reporting
steps; on a reporting step it starts one device-to-host copy and a worker thread does the rest.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logitwatch.agent.monitoring.actions import AlertDispatcher, LocalGuard
from logitwatch.agent.monitoring.attach import discover
from logitwatch.agent.monitoring.config import MonitorConfig
from logitwatch.agent.monitoring.distributed import (
    MAX_ALERTS,
    Decisions,
    RankSync,
    dist_rank_world,
    write_host,
)
from logitwatch.agent.monitoring.reduce import DEN
from logitwatch.agent.monitoring.report import Reporter
from logitwatch.agent.probes.hooks import ProbeSet, Sites
from logitwatch.agent.probes.optim import ParamStats, layer_of_param
from logitwatch.agent.probes.reductions import Slots
from logitwatch.agent.transport.sink import FanOutSink, NullSink, SeriesKey, Sink, series_key

__all__ = ["Monitor", "MonitorConfig"]

log = logging.getLogger("logitwatch.agent")


class Monitor:
    """Watch a model's stability metrics during training.

    >>> import torch
    >>> from logitwatch.agent import Monitor
    >>> from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
    >>> from logitwatch.agent.transport.sink import MemorySink
    >>> model = Decoder(DecoderConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> sink = MemorySink()
    >>> with Monitor(model, opt, run="demo", sink=sink, every=2) as monitor:
    ...     for step in range(4):
    ...         idx = torch.randint(0, 64, (2, 16))
    ...         ce, z = loss_fn(model(idx), idx, z_loss=0.0)
    ...         (ce + z).backward(); opt.step(); opt.zero_grad()
    ...         monitor.step(step, loss=ce + z, tokens=idx.numel())
    >>> sink.series("attn.logit_max", layer=1, head=0)[0]
    [0, 2]
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        run: str,
        server: str | None = None,
        every: int | None = None,
        config: MonitorConfig | None = None,
        sink: Sink | None = None,
        token: str | None = None,
        spool_dir: str | os.PathLike | None = None,
        run_config: Mapping[str, Any] | None = None,
        start_step: int | None = None,
        sites: Sites | None = None,
        also: Iterable[Sink] = (),
    ) -> None:
        if not isinstance(run, str) or not run:
            raise ValueError(f"run must be a non-empty name; got {run!r}.")
        cfg = config or MonitorConfig()
        self.config = cfg = replace(cfg, every=every) if every is not None else cfg
        self.model, self.run = model, run
        self.optimizer = _unwrap(optimizer)
        self.rank = _rank(cfg)
        self.label = {"rank": str(self.rank)} if cfg.per_rank else {}
        self._keys: dict[str, tuple[SeriesKey, ...]] = {}  # see _layer_keys
        self.reports = cfg.per_rank or self.rank == 0  # rank 0 reports unless per_rank is on
        dist_rank, world = dist_rank_world()
        # Under torch.distributed every rank probes and joins each reporting step's collective.
        self.active = self.reports or world > 1
        self.ranks: RankSync | None = None
        self._host: dict = {}
        self._closed = False
        self.alerts = AlertDispatcher()  # on_alert callbacks, run at step boundaries
        self._handles: list[Any] = []
        self._probes: ProbeSet | None = None
        self._grads_recorded = False
        self._grads_after_step = False  # the optimizer's own gradient norms, read after it
        self._weights_due = True  # the first step seen reads the weights, then weights_every
        self._backward_norms: list[torch.Tensor | None] = []
        self._tokens = 0
        self._last_report: float | None = None
        if not self.reports:
            self.sink: Sink = NullSink()
            self._reporter = Reporter(self.sink, self.label, cfg.max_pending)
            if self.active:
                self._start(model, sites, world)
            return
        self.sink = (
            sink if sink is not None else self._default_sink(server, token, spool_dir, start_step)
        )
        if also:  # W&B, TensorBoard, ...: beside the service (or file) sink, not instead of it
            self.sink = FanOutSink([self.sink, *([also] if isinstance(also, Sink) else also)])
        try:
            self.sink.register_run(run, config=dict(run_config or {}))
        except Exception as e:
            log.warning("logitwatch: could not register run %r (%s)", run, e)
        # The local guard raises non-finite alerts with no service at all.
        reported = FanOutSink([self.sink, LocalGuard()])
        self._reporter = Reporter(reported, self.label, cfg.max_pending)
        if dist_rank == 0:  # under torch.distributed rank 0 decides, and every rank acts
            self._reporter.on_alert(self.alerts.notify)
        if callable(getattr(self.sink, "alert", None)):  # each newly firing alert, once
            self._reporter.on_alert(self.sink.alert)
        self._start(model, sites, world)

    def _start(self, model: nn.Module, sites: Sites | None, world: int) -> None:
        param = next(model.parameters(), None)
        self.slots = Slots(param.device if param is not None else "cpu")
        if world > 1:
            self.ranks = RankSync(
                per_rank=self.config.per_rank, reports=self.reports, device=self.slots.device
            )
        self.use_sites(sites if sites is not None else discover(model))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._post_step))

    def _default_sink(self, server, token, spool_dir, start_step) -> Sink:
        try:
            if server is not None:
                from logitwatch.agent.transport.sender import HttpSink

                return HttpSink(
                    server, self.run, token=token, spool_dir=spool_dir, resume_from_step=start_step
                )

            from logitwatch.agent.transport.filesink import FileSink

            directory = Path(".logitwatch") / "runs" / self.run
            if self.config.per_rank:
                directory = directory / f"rank{self.rank}"
            return FileSink(directory, self.run)
        except ImportError as e:  # the transport is missing: still never break training
            log.warning("logitwatch: no transport available (%s); metrics are discarded", e)
            return NullSink()

    # -- probe sites ------------------------------------------------------------------------

    def use_sites(self, sites: Sites) -> None:
        """Replace the model probes (``attach`` calls this)."""
        if not self.active:
            return
        armed = self._probes.armed if self._probes is not None else True  # first step reports
        if self._probes is not None:
            self._probes.close()
        for h in getattr(self, "_param_handles", []):
            h.remove()
        self._param_handles: list[Any] = []
        self._probes = ProbeSet(sites, self.slots, self.config, self.label)
        self._probes.armed = armed
        self.params = ParamStats(
            self.model.named_parameters(),
            layer_of_param(sites.layer_prefixes),
            self.slots.device,
            world=self.ranks.world if self.ranks is not None else None,
        )
        if self.ranks is not None:
            self.ranks.plan_capacity(max(len(sites.qk), len(sites.resid), len(self.params.layers)))
        if self.config.grads == "backward" and "grad" in self.config.probes:
            self._backward_norms = [None] * len(self.params.params)
            for j, p in enumerate(self.params.params):
                self._param_handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(j)))

    @property
    def armed(self) -> bool:
        return self._probes is not None and self._probes.armed

    # -- optimizer side ---------------------------------------------------------------------

    def record_grads(self) -> None:
        """Read the gradients now (call before clipping when clipping happens outside step())."""
        if self.active and self.armed and "grad" in self.config.probes:
            self._guard("grad", self._write_grads, None)

    def _write_grads(self, norms: list[torch.Tensor] | None) -> None:
        values = self.params.grads(norms)
        if values is None:
            return
        keys = self._layer_keys("grad.norm", series_key("_nonfinite.grads"))
        self.slots.write("grad", keys, values)
        self._grads_recorded = True

    def _grad_hook(self, j: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if self.armed and p.grad is not None:
                # Each micro-batch overwrites: the last one sees the whole accumulated gradient.
                self._backward_norms[j] = torch.linalg.vector_norm(
                    self.params.local(p.grad.detach()), dtype=torch.float32
                )

        return hook

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if not self.armed:
            return
        on = self.config.probes
        if "grad" in on and self.config.grads == "optimizer" and not self._grads_recorded:
            if self.ranks is None and hasattr(optimizer, "last_grad_norms"):
                # The optimizer takes each gradient's norm before it clips (ClippedAdamW):
                # read those after its step rather than every gradient again now.
                optimizer.last_grad_norms = None
                self._grads_after_step = True
            else:
                self._guard("grad", self._write_grads, None)
        if "update" in on and self._weights_due:
            self._guard("update", self.params.snapshot)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._grads_after_step and self.armed:  # (a step that raised leaves it set)
            self._grads_after_step = False
            norms = getattr(optimizer, "last_grad_norms", None)
            if norms is not None:
                found = [norms.get(id(p)) for p in self.params.params]
                self._guard("grad", self._write_grads, found)
            else:  # the step took no norms this time (no gradient, or DTensors)
                self._guard("grad", self._write_grads, None)
        if self.armed and self._weights_due and ({"param", "update"} & set(self.config.probes)):
            self._guard("param", self._write_weights)

    def _write_weights(self) -> None:
        # Reading them every step: the next step's snapshot is the copy this call leaves.
        norms, ratio = self.params.weights(keep=self.config.weights_every == 1)
        if "param" in self.config.probes:
            self.slots.write("param", self._layer_keys("param.norm"), norms)
        if ratio is not None and "update" in self.config.probes:
            keys = self._layer_keys("update.ratio")
            if self.params.squared:  # divided once every rank's share is summed
                den = [(DEN + metric, labels) for metric, labels in keys]
                self.slots.write("update.den", den, ratio[len(keys) :])
                ratio = ratio[: len(keys)]
            self.slots.write("update", keys, ratio)

    def _layer_keys(self, metric: str, *more: SeriesKey) -> tuple[SeriesKey, ...]:
        """``metric``'s series keys, global then per layer, then ``more``: made once, used
        every report."""
        keys = self._keys.get(metric)
        if keys is None:
            layers = self.params.layers
            keys = (series_key(metric, **self.label),)
            keys += tuple(series_key(metric, layer=i, **self.label) for i in layers) + more
            self._keys[metric] = keys
        return keys

    def _guard(self, kind: str, fn: Callable[..., None], *args: Any) -> None:
        if self._probes is None or kind in self._probes.disabled:
            return
        self._probes.guard(kind, fn, *args)

    # -- the training loop's call -----------------------------------------------------------

    def step(
        self,
        step: int,
        loss: torch.Tensor | float | None = None,
        loss_z: torch.Tensor | float | None = None,
        tokens: int | None = None,
    ) -> None:
        """Call once after each optimizer step. Never raises, never waits for the device.
        Under torch.distributed call it on every rank with the same ``step``: a reporting step
        runs one collective (see monitoring/distributed.py)."""
        if not self.active or self._closed:
            return
        if self.ranks is not None:
            self._step_ranks(step, loss, loss_z, tokens)
            return
        try:
            self._tokens += int(tokens or 0)
            if self.armed:
                self._report(step, loss, loss_z)
            self._arm(step + 1)
            self.alerts.run_pending(step)
        except Exception as e:
            self._reporter.warn_once(
                "step", "step() failed (%s: %s); monitoring goes on", type(e).__name__, e
            )

    def _report(self, step: int, loss: Any, loss_z: Any) -> None:
        on, label, host = self.config.probes, self.label, {}
        if "loss" in on:
            for name, value in (("loss", loss), ("loss.z", loss_z)):
                if isinstance(value, torch.Tensor):
                    v = value.detach().float().reshape(1)
                    keys = [series_key(name, **label), series_key("_nonfinite." + name)]
                    self.slots.write(name, keys, torch.cat([v, (~torch.isfinite(v)).float()]))
                elif value is not None:
                    host[series_key(name, **label)] = float(value)
        if "lr" in on and self.optimizer is not None:
            for i, group in enumerate(self.optimizer.param_groups):
                host[series_key("lr", group=group.get("name", i), **label)] = float(group["lr"])
        if "grad" in on and not self._grads_recorded:
            if self.config.grads == "backward":
                self._guard("grad", self._write_grads, self._backward_norms)
                self._backward_norms = [None] * len(self._backward_norms)
            elif self.optimizer is None:  # no step pre-hook: the gradients are read now
                self._guard("grad", self._write_grads, None)
        if self.optimizer is None and "param" in on and self._weights_due:
            self._guard("param", self._write_weights)
        now = time.perf_counter()
        if "throughput" in on and self._last_report is not None and self._tokens:
            host[series_key("throughput.tokens_per_s", **label)] = self._tokens / max(
                now - self._last_report, 1e-9
            )
        self._last_report, self._tokens = now, 0
        if self.ranks is not None:  # the values go out with every rank's in _step_ranks
            self._host = write_host(self.slots, host)
            return
        self._reporter.ship(step, self.slots, self.slots.take(), host)

    def _step_ranks(self, step: int, loss: Any, loss_z: Any, tokens: int | None) -> None:
        """step() under torch.distributed. On reporting steps (the same on every rank) every
        rank joins the one collective whatever failed before it, then acts on rank 0's
        decisions; between them it does nothing that another rank must match."""
        armed, ranks = self.armed, self.ranks
        self._host = {}
        try:
            self._tokens += int(tokens or 0)
            if armed:
                self._report(step, loss, loss_z)
        except Exception as e:
            self._reporter.warn_once(
                "step", "step() failed (%s: %s); monitoring goes on", type(e).__name__, e
            )
        if armed:
            sent = self.alerts.take(MAX_ALERTS) if ranks.rank == 0 else []
            off = set(self._probes.disabled) if self._probes is not None else set()
            shipped, decided = ranks.exchange(self.slots, off, sent)  # never raises
            try:
                if shipped is not None:
                    self._reporter.ship(step, shipped, shipped.blocks, self._host, shipped.check)
            except Exception as e:  # whatever happens to this rank's report, it acts below
                self._reporter.warn_once("ship", "could not ship a report (%s)", e)
            if decided is not None:
                self._decide(decided, step)  # callbacks' errors are caught and logged
        self._arm(step + 1)

    def _arm(self, step: int) -> None:
        """Set up the probes for ``step``: armed on reporting steps, the weights read on those
        that are multiples of weights_every (by step number: the same steps on every rank)."""
        if self._probes is not None:
            self._probes.armed = step % self.config.every == 0
        self._weights_due = step % self.config.weights_every == 0
        self._grads_recorded = False

    def _decide(self, decided: Decisions, step: int) -> None:
        """The same on every rank: probes off anywhere go off everywhere (the ranks' reports
        keep one layout), and rank 0's alerts run every rank's on_alert callbacks."""
        if self._probes is not None:
            for kind in sorted(decided.off - self._probes.disabled):
                self._probes.disabled.add(kind)
                log.warning("logitwatch: probe %r is off on every rank (it failed on one)", kind)
        self.alerts.run(decided.alerts, step)

    # -- alerts and shutdown ----------------------------------------------------------------

    def firing_alerts(self) -> list[dict[str, Any]]:
        """The run's firing alerts: the service's last answer, plus the local guard's."""
        try:
            return self._reporter.sink.firing_alerts()
        except Exception:
            return []

    def on_alert(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(alert)`` for each newly firing alert, on the training thread in step().

        Built-in actions (logitwatch.agent.monitoring.actions): Checkpoint, LowerLR, StopTraining.
        """
        self.alerts.add(callback)

    @property
    def should_stop(self) -> bool:
        """True once a StopTraining action asked the loop to stop at this step boundary."""
        return self.alerts.should_stop

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every reported step reached the sink, then flush the sink."""
        start = time.monotonic()
        done = self._reporter.drain(timeout)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        return done and bool(self.sink.flush(left))

    def close(self, timeout: float | None = None) -> None:
        """Remove every hook, flush, and close the sink; returns within ``timeout`` (default
        ``config.close_timeout_s``), having waited that long for an unreachable service.
        Points still undelivered then are named in a warning and in ``undelivered``."""
        if self._closed:
            return
        self._closed = True
        timeout = self.config.close_timeout_s if timeout is None else timeout
        start = time.monotonic()
        if self._probes is not None:
            self._probes.close()
        for h in [*self._handles, *getattr(self, "_param_handles", [])]:
            h.remove()
        self._handles, self._param_handles = [], []
        self._reporter.drain(timeout)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        self._reporter.stop(left)
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        try:
            self.sink.close(left)
        except Exception as e:
            log.warning("logitwatch: closing the sink failed (%s)", e)

    @property
    def undelivered(self) -> Any:
        """After close: the points the service did not get (steps, spool path, and the
        ``logitwatch sync`` command that delivers them: sender.Undelivered), or None."""
        return getattr(self.sink, "undelivered", None) if self._closed else None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unwrap(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside wrappers (accelerate's AcceleratedOptimizer, Lightning's)."""
    while optimizer is not None and not type(optimizer).__module__.startswith("torch.optim"):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def _rank(cfg: MonitorConfig) -> int:
    if cfg.rank is not None:
        return cfg.rank
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)
