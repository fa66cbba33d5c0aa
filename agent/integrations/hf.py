"""Hugging Face transformers: a Trainer callback that runs a Monitor on the model and its optimizer.

The Monitor finds the model's probe sites itself (``logitwatch.agent.probes.hf``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from transformers import TrainerCallback

from logitwatch.agent.monitoring.config import MonitorConfig
from logitwatch.agent.monitoring.monitor import Monitor

__all__ = ["LogitwatchCallback"]


class LogitwatchCallback(TrainerCallback):
    """Report a ``transformers.Trainer`` run: every probe, the loss, the LR, tokens/s.

    >>> trainer = Trainer(model, args, train_dataset=ds,  # doctest: +SKIP
    ...                   callbacks=[LogitwatchCallback("my-run", server="http://localhost:8000")])

    The Trainer clips gradients before ``optimizer.step()``, so gradient norms are read by
    per-parameter hooks at the end of backward (before clipping). The loss is read from the
    model's output on reporting steps (the last micro-batch's, under gradient accumulation).
    """

    def __init__(
        self,
        run: str | None = None,
        *,
        server: str | None = None,
        every: int | None = None,
        config: MonitorConfig | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        self.run, self.server, self.every = run, server, every
        self.config = config or MonitorConfig()
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.undelivered: Any = None  # set at train end: points the service did not get
        self._loss: torch.Tensor | None = None
        self._tokens = 0
        self._hook: Any = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.monitor is not None or model is None:
            return
        run = self.run or args.run_name or "hf-run"
        config = (
            replace(self.config, grads="backward")
            if self.config.grads == "optimizer"
            else self.config
        )
        run_config = {"model": model.config.to_dict(), "training_args": args.to_sanitized_dict()}
        self.monitor = Monitor(
            model,
            optimizer,
            run=run,
            server=self.server,
            every=self.every,
            config=config,
            run_config=self.monitor_kwargs.pop("run_config", run_config),
            start_step=state.global_step or None,
            **self.monitor_kwargs,
        )
        self._hook = model.register_forward_hook(self._read_output, with_kwargs=True)

    def _read_output(self, module, args, kwargs, output) -> None:
        if not torch.is_grad_enabled():
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            self._tokens += ids.numel()
        if self.monitor is not None and self.monitor.armed:
            loss = output.get("loss") if hasattr(output, "get") else None
            if isinstance(loss, torch.Tensor):
                self._loss = loss.detach()

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.step(state.global_step, loss=self._loss, tokens=self._tokens)
            self._loss, self._tokens = None, 0

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            # Waits up to close_timeout_s for the service; what it still lacks then is logged
            # (count, spool, the `logitwatch sync` command) and kept in ``undelivered``.
            self.monitor.close()
            self.undelivered = self.monitor.undelivered
            self.monitor = None
