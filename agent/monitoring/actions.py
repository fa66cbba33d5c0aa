"""What the training process does about an alert: callbacks, built-in actions, a local guard.

Alerts arrive on the Monitor's worker thread (from the service's ingest answer, or from the
local guard); the dispatcher queues them and runs the callbacks on the training thread inside
``Monitor.step``, at a step boundary, where touching the optimizer or saving is safe.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from logitwatch.agent.transport.sink import SeriesKey, Sink

__all__ = [
    "ACTIONS",
    "AlertDispatcher",
    "Checkpoint",
    "LocalGuard",
    "LowerLR",
    "StopTraining",
    "install_actions",
]

log = logging.getLogger("logitwatch.agent")

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
#: Names for ``logitwatch train --on-alert``.
ACTIONS = ("checkpoint", "lower-lr", "stop")

Alert = dict[str, Any]


def _rank(severity: str) -> int:
    if severity not in SEVERITY_RANK:
        raise ValueError(f"severity must be one of {', '.join(SEVERITY_RANK)}; got {severity!r}.")
    return SEVERITY_RANK[severity]


class _Action:
    """An alert callback that acts on alerts of ``severity`` or worse, at most once per cooldown."""

    def __init__(self, severity: str, cooldown_steps: int) -> None:
        if (
            isinstance(cooldown_steps, bool)
            or not isinstance(cooldown_steps, int)
            or cooldown_steps < 0
        ):
            raise ValueError(f"cooldown_steps must be an integer >= 0; got {cooldown_steps!r}.")
        self.min_rank = _rank(severity)
        self.cooldown_steps = cooldown_steps
        self.last_step: int | None = None  # the step this action last ran at
        self.count = 0

    def __call__(self, alert: Alert, step: int | None = None) -> None:
        if SEVERITY_RANK.get(str(alert.get("severity")), 0) < self.min_rank:
            return
        recent = step is not None and self.last_step is not None
        if recent and step - self.last_step < self.cooldown_steps:
            return
        self.last_step, self.count = step, self.count + 1
        self.act(alert)

    def act(self, alert: Alert) -> None:
        raise NotImplementedError


class Checkpoint(_Action):
    """Call ``save(alert)`` on a critical alert (by default), e.g. to keep the last good state."""

    def __init__(
        self, save: Callable[[Alert], Any], *, severity: str = "critical", cooldown_steps: int = 100
    ) -> None:
        super().__init__(severity, cooldown_steps)
        self.save = save

    def act(self, alert: Alert) -> None:
        log.warning("logitwatch: %s: saving a checkpoint", _describe(alert))
        self.save(alert)


class LowerLR(_Action):
    """Multiply every group's LR by ``factor`` (and the scheduler's base LRs, so it lasts).

    A closed-form scheduler recomputes the LR from ``base_lrs`` each step: pass it, or the
    lower LR holds for one step only.
    """

    def __init__(
        self,
        optimizer: Any,
        factor: float = 0.5,
        *,
        scheduler: Any = None,
        severity: str = "warning",
        cooldown_steps: int = 100,  # many alerts from one cause lower the LR once
    ) -> None:
        ok = isinstance(factor, int | float) and not isinstance(factor, bool)
        if not ok or not 0 < factor < 1:
            raise ValueError(f"factor must be a number in (0, 1); got {factor!r}.")
        super().__init__(severity, cooldown_steps)
        self.optimizer, self.scheduler, self.factor = optimizer, scheduler, float(factor)

    def act(self, alert: Alert) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= self.factor
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * self.factor for lr in self.scheduler.base_lrs]
        lr = self.optimizer.param_groups[0]["lr"]
        log.warning("logitwatch: %s: LR lowered x%g to %.3g", _describe(alert), self.factor, lr)


class StopTraining(_Action):
    """Ask the loop to stop at the next step boundary (``Monitor.should_stop`` turns True)."""

    def __init__(self, *, severity: str = "critical") -> None:
        super().__init__(severity, 0)
        self.requested = False

    def act(self, alert: Alert) -> None:
        log.warning("logitwatch: %s: stopping at the next step boundary", _describe(alert))
        self.requested = True


class AlertDispatcher:
    """Queues newly firing alerts from any thread; runs the callbacks at ``run_pending(step)``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Alert] = []
        self.callbacks: list[Callable[..., Any]] = []
        self.seen: list[Alert] = []  # every alert dispatched so far, in order

    def add(self, callback: Callable[..., Any]) -> None:
        self.callbacks.append(callback)

    def notify(self, alert: Alert) -> None:
        """Called once per newly firing alert (on the Monitor's worker thread)."""
        with self._lock:
            self._pending.append(with_fired_step(alert))

    def run_pending(self, step: int) -> None:
        """Run every callback on every queued alert; called on the training thread."""
        with self._lock:
            alerts, self._pending = self._pending, []
        self.run(alerts, step)

    def take(self, limit: int) -> list[Alert]:
        """Up to ``limit`` queued alerts, most severe first; the rest stay queued. Under
        torch.distributed rank 0 takes them at a reporting step and every rank runs them."""
        with self._lock:
            order = sorted(
                self._pending, key=lambda a: -SEVERITY_RANK.get(str(a.get("severity")), 0)
            )
            taken = order[:limit]
            self._pending = [a for a in self._pending if not any(a is t for t in taken)]
        return taken

    def run(self, alerts: Iterable[Alert], step: int) -> None:
        """Run every callback on each of ``alerts``, in order; called on the training thread."""
        for alert in map(with_fired_step, alerts):
            self.seen.append(alert)
            for callback in self.callbacks:
                try:
                    if isinstance(callback, _Action):
                        callback(alert, step)
                    else:
                        callback(alert)
                except Exception as e:  # a user's callback must not end the run
                    log.warning(
                        "logitwatch: an on_alert callback failed (%s: %s)", type(e).__name__, e
                    )

    @property
    def should_stop(self) -> bool:
        return any(getattr(cb, "requested", False) for cb in self.callbacks)


class LocalGuard(Sink):
    """A sink that raises a critical alert for a non-finite loss or gradient, with no service.

    It sees each reported step's values (every ``every`` steps); NaN weights stay NaN, so a
    non-finite gradient between two reports shows up as a non-finite loss at the next one.
    """

    WATCHED = ("loss", "loss.z", "grad.norm")

    def __init__(self) -> None:
        self._alerts: list[Alert] = []

    def log(
        self, step: int, values: Mapping[SeriesKey, float], *, time: float | None = None
    ) -> None:
        if self._alerts:  # one alert per run: the first bad step is the one that matters
            return
        for (metric, labels), value in values.items():
            bad = metric == "nonfinite.count" and value > 0
            if bad or (metric in self.WATCHED and not math.isfinite(value)):
                self._alerts.append(
                    {
                        "id": "local-nonfinite",
                        "rule": "local-nonfinite",
                        "severity": "critical",
                        "metric": metric,
                        "labels": dict(labels),
                        "first_step": step,
                        "fired_step": step,
                        "last_step": step,
                        "value": value,
                        "hint": "restart from a checkpoint and skip the offending batches (PaLM); "
                        "then lower the LR",
                        "source": "local guard",
                    }
                )
                return

    def firing_alerts(self) -> list[Alert]:
        return list(self._alerts)


def install_actions(
    monitor: Any,
    names: Iterable[str],
    *,
    optimizer: Any = None,
    scheduler: Any = None,
    save: Callable[[Alert], Any] | None = None,
    lr_factor: float = 0.5,
) -> list[_Action]:
    """Switch on built-in actions by name (``checkpoint``, ``lower-lr``, ``stop``)."""
    made: list[_Action] = []
    for name in names:
        if name == "checkpoint":
            if save is None:
                raise ValueError("on_alert: checkpoint needs a save function.")
            made.append(Checkpoint(save))
        elif name == "lower-lr":
            if optimizer is None:
                raise ValueError("on_alert: lower-lr needs the optimizer.")
            made.append(LowerLR(optimizer, lr_factor, scheduler=scheduler))
        elif name == "stop":
            made.append(StopTraining())
        else:
            raise ValueError(f"on_alert: unknown action {name!r}; known: {', '.join(ACTIONS)}.")
    for action in made:
        monitor.on_alert(action)
    return made


def with_fired_step(alert: Alert) -> Alert:
    """A copy of ``alert`` that says at which step it went firing (``fired_step``): the
    service's own, else (an older service, rank 0's relay under torch.distributed) its first."""
    out = dict(alert)
    if out.get("fired_step") is None:
        out["fired_step"] = out.get("first_step")
    return out


def _describe(alert: Alert) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted((alert.get("labels") or {}).items()))
    where = f"{{{labels}}}" if labels else ""
    step = alert.get("fired_step", alert.get("first_step"))
    return f"{alert.get('severity')} alert {alert.get('rule')}{where} fired at step {step}"


def check_action_names(names: Any, *, monitored: bool) -> tuple[str, ...]:
    """Validate ``TrainConfig.on_alert``: known names, and a monitor to receive alerts."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"on_alert must be a list of action names; got {names!r}.")
    for name in names:
        if name not in ACTIONS:
            raise ValueError(f"on_alert: unknown action {name!r}; known: {', '.join(ACTIONS)}.")
    if names and not monitored:
        raise ValueError("on_alert needs monitoring: give server, run or spool as well.")
    return tuple(names)


def trainer_actions(names: Iterable[str], monitor: Any, optimizer: Any, scheduler: Any) -> list:
    """Install ``names`` for ``logitwatch train``; returns the list the checkpoint action fills.

    The loop saves at its own step boundary (after the scheduler step) when the list is
    non-empty, so the checkpoint resumes exactly like a scheduled one.
    """
    requests: list[Alert] = []
    if names:
        install_actions(monitor, names, optimizer=optimizer, scheduler=scheduler,
                        save=requests.append)  # fmt: skip
    return requests
