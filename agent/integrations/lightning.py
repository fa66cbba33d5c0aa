"""PyTorch Lightning: a callback that runs a Monitor on the LightningModule and its optimizer."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from logitwatch.agent.monitoring.config import MonitorConfig
from logitwatch.agent.monitoring.monitor import Monitor

__all__ = ["LogitwatchLightningCallback"]


class LogitwatchLightningCallback(Callback):
    """Report a Lightning run: every probe on the module, the loss, the LR, tokens/s.

    >>> trainer = lightning.Trainer(callbacks=[LogitwatchLightningCallback("my-run")])  # doctest: +SKIP

    Gradients are read in ``on_before_optimizer_step``, after backward and before Lightning
    clips them; the loss is ``training_step``'s. Steps are Lightning's ``global_step``.
    """

    def __init__(
        self,
        run: str,
        *,
        server: str | None = None,
        every: int | None = None,
        config: MonitorConfig | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        self.run, self.server, self.every = run, server, every
        self.config = replace(config or MonitorConfig(), grads="manual")
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.undelivered: Any = None  # set at train end: points the service did not get
        self._last_step = -1
        self._tokens = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        hparams = dict(getattr(pl_module, "hparams", {}) or {})
        self.monitor = Monitor(
            pl_module,
            optimizer,
            run=self.run,
            server=self.server,
            every=self.every,
            config=self.config,
            run_config=self.monitor_kwargs.pop("run_config", hparams),
            start_step=trainer.global_step or None,
            **self.monitor_kwargs,
        )
        self._last_step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.monitor is not None:
            self.monitor.record_grads()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None:
            return
        first = batch[0] if isinstance(batch, list | tuple) and batch else batch
        if isinstance(first, torch.Tensor):
            self._tokens += first.numel()
        if trainer.global_step == self._last_step:
            return  # gradient accumulation: no optimizer step yet
        self._last_step = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.monitor.step(trainer.global_step, loss=loss, tokens=self._tokens)
        self._tokens = 0

    def on_train_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            # Waits up to close_timeout_s for the service; what it still lacks then is logged
            # (count, spool, the `logitwatch sync` command) and kept in ``undelivered``.
            self.monitor.close()
            self.undelivered = self.monitor.undelivered
            self.monitor = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)  # hooks come off even when training fails
