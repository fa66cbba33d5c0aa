"""The W&B sink: every probe into a Weights & Biases run, each newly firing alert as a W&B alert.

Named ``wandb_sink`` rather than ``wandb`` so that a script run from this folder never shadows
the ``wandb`` package.
"""

from __future__ import annotations

import json
from typing import Any

from logitwatch.agent.transport.forward import ForwardingSink, alert_text, alert_title

__all__ = ["WandbSink"]

_LEVELS = {"info": "INFO", "warning": "WARN", "critical": "ERROR"}


class WandbSink(ForwardingSink):
    """Forward a Monitor's series, and its alerts, to a W&B run.

    >>> run = wandb.init(project="my-project")  # doctest: +SKIP
    >>> monitor = Monitor(model, opt, run="my-run", server=URL, also=[WandbSink(run)])  # doctest: +SKIP

    Keys are ``logitwatch/attn.logit_max/layer0/head3``. W&B drops a ``log`` whose step is
    below its current ``_step``, and our points arrive a second behind the training loop's
    own ``run.log`` calls: so they never pass ``step=``, and carry the training step as
    ``logitwatch/step``, declared with ``define_metric`` as the x-axis of ``logitwatch/*``.
    Each newly firing alert becomes ``run.alert(title, text, level)`` (info → INFO,
    warning → WARN, critical → ERROR). The run's configuration goes to
    ``run.config["logitwatch"]``. Close the Monitor before ``run.finish()``.

    Without ``run``, the sink writes to ``wandb.run`` as it is when it writes: a run that an
    integration starts later (transformers' ``report_to="wandb"``) is found then.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        prefix: str = "logitwatch",
        alerts: bool = True,
        interval: float = 1.0,
        max_queue_mb: float = 32.0,
        close_timeout: float = 10.0,
    ) -> None:
        if run is None:
            try:
                import wandb  # noqa: F401 - fail here, not on the writer thread
            except ImportError as exc:
                raise ImportError("WandbSink needs wandb: pip install 'logitwatch[wandb]'") from exc
        elif not callable(getattr(run, "log", None)):
            raise ValueError(f"WandbSink needs a W&B run (from wandb.init()), not {run!r}.")
        self.run = run
        self.step_key = f"{prefix}/step" if prefix else "logitwatch_step"
        self._defined: set[str] = set()
        super().__init__(
            prefix=prefix,
            interval=interval,
            max_queue_mb=max_queue_mb,
            close_timeout=close_timeout,
            alerts=alerts,
            name="logitwatch-wandb",
        )

    def _run(self) -> Any:
        """The run to write to; raises (logged once by the caller) while there is none."""
        if self.run is None:
            import wandb

            if wandb.run is None:
                raise RuntimeError("no W&B run: call wandb.init() (points are dropped until then)")
            self.run = wandb.run
        return self.run

    def _define(self, keys) -> None:
        """Our step metric as the x-axis of our keys: once for the prefix, or once per key."""
        if not self._defined:
            self.run.define_metric(self.step_key)
            if self.prefix:
                self.run.define_metric(f"{self.prefix}/*", step_metric=self.step_key)
            self._defined.add(self.step_key)
        if not self.prefix:  # no namespace of our own: a glob would take the user's keys too
            for key in keys:
                if key not in self._defined:
                    self.run.define_metric(key, step_metric=self.step_key)
                    self._defined.add(key)

    def _write_step(self, step: int, time: float, values: dict[str, float]) -> None:
        run = self._run()
        self._define(values)
        values[self.step_key] = step
        run.log(values)

    def _write_alert(self, alert: dict[str, Any]) -> None:
        level = _LEVELS.get(str(alert.get("severity")), "WARN")
        title = f"logitwatch: {alert_title(alert)}"
        # W&B wants titles under 64 characters; it holds back a repeat of one title for a
        # minute, so the series labels stay in the title.
        self._run().alert(title=title[:63], text=alert_text(alert), level=level)

    def _write_run(self, run: str, info: dict[str, Any]) -> None:
        config = json.loads(json.dumps({"run": run, **info}, default=str))  # plain JSON only
        self._run().config.update({"logitwatch": config}, allow_val_change=True)
