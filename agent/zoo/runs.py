"""One zoo run: train a case through the real agent into a service, and keep what the plot needs.

Runs in a worker process (spawned: torch and fork do not mix), single-threaded so that
two runs share two cores. The zoo-only knobs are applied from outside the trainer: in this
worker the trainer's sampler is swapped for one that returns a chunk of random bytes (inputs
and targets: a binary blob in the corpus) at the corrupted steps, and an optimizer pre-hook
scales the LR after a resume.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunOutput", "run_case"]

#: Series the plot and the report read back from the agent's side (what the service also got).
PLOTTED = ("loss", "lr", "logz.mean", "attn.logit_max", "grad.norm", "update.ratio")


@dataclass
class RunOutput:
    case: str
    seed: int
    run: str
    losses: list[float]  # every step's training loss (ce + z), from the trainer
    series: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    seconds: float = 0.0
    corrupted_steps: list[int] = field(default_factory=list)
    resume_step: int | None = None
    error: str | None = None


def run_case(
    case: Any, scale: Any, seed: int, server: str, prefix: str, metrics_dir: str | None = None
) -> RunOutput:
    """Train ``case`` at ``scale`` with ``seed``, reporting to ``server`` as
    ``{prefix}{case}-s{seed}``, and into ``metrics_dir/<run>.jsonl`` (a FileSink) when given."""
    import time

    import torch

    from logitwatch.agent.monitoring.monitor import Monitor
    from logitwatch.agent.reference.train import TrainConfig, train
    from logitwatch.agent.transport.filesink import FileSink
    from logitwatch.agent.transport.sink import FanOutSink, MemorySink

    torch.set_num_threads(1)
    run = f"{prefix}{case.name}-s{seed}"
    if case.trainer != "reference":
        return _run_other(case, scale, seed, server, run, metrics_dir)
    steps = scale.steps
    # Knobs at reporting steps: a spike between two reports would be invisible to everyone.
    corrupt = sorted({_on_report(f * steps, scale.every) for f in case.corrupt_at})
    resume = _on_report(case.resume_at * steps, scale.every) if case.resume_at else None
    memory = MemorySink()
    out = RunOutput(case.name, seed, run, [], corrupted_steps=corrupt, resume_step=resume)
    start = time.perf_counter()

    def factory(model, optimizer, *, start_step=None, **kwargs):
        from logitwatch.agent.transport.sender import HttpSink

        if resume is not None and start_step:
            _scale_lr(optimizer, case.resume_lr_scale)
        http = HttpSink(server, run, resume_from_step=start_step, spool_dir=spool / "spool")
        kwargs.pop("server", None)
        kwargs.pop("spool_dir", None)
        sinks = [http, memory] + ([FileSink(metrics_dir, run)] if metrics_dir else [])
        return Monitor(model, optimizer, sink=FanOutSink(sinks), **kwargs)

    with tempfile.TemporaryDirectory(prefix="lwzoo-") as tmp:
        spool = Path(tmp)
        sized = scale.train_overrides()
        model = {} if case.overrides.get("preset") else sized["model"]  # a preset's CPU size
        base = {
            **sized,
            **case.overrides,
            "model": {**model, **case.overrides.get("model", {})},
            "seed": seed,
            "run": run,
            "server": server,
            "device": "cpu",
            "eval_batches": 0,
            "progress": False,
            "log_every": scale.every,
        }
        sampler = _CorruptBatches(corrupt)
        try:
            if resume is None:
                out.losses = train(TrainConfig(**base), monitor_factory=factory).losses
            else:  # phase 1 stops at the checkpoint; phase 2 resumes from it with the bad LR
                first = TrainConfig(**base, save_every=resume, save_dir=str(spool / "ckpt"))
                stop_at = [lambda info: info.step + 1 >= resume]
                out.losses = train(first, monitor_factory=factory, callbacks=stop_at).losses
                second = TrainConfig(**base, resume=str(spool / "ckpt"))
                out.losses += train(second, monitor_factory=factory).losses
        except Exception as exc:  # a run that crashes is a result too, not the zoo's end
            out.error = f"{type(exc).__name__}: {exc}"
        finally:
            sampler.close()
    out.seconds = time.perf_counter() - start
    out.series = _plotted(memory)
    return out


def _run_other(
    case: Any, scale: Any, seed: int, server: str, run: str, metrics_dir: str | None
) -> RunOutput:
    """A case of another loop (Hugging Face Trainer, attach): see agent/zoo/trainers.py."""
    import time

    from logitwatch.agent.transport.filesink import FileSink
    from logitwatch.agent.transport.sender import HttpSink
    from logitwatch.agent.transport.sink import FanOutSink, MemorySink
    from logitwatch.agent.zoo.trainers import train_attach, train_hf

    memory = MemorySink()
    out = RunOutput(case.name, seed, run, [])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lwzoo-") as tmp:
        sinks = [HttpSink(server, run, spool_dir=Path(tmp) / "spool"), memory]
        sinks += [FileSink(metrics_dir, run)] if metrics_dir else []
        sink = FanOutSink(sinks)
        try:
            if case.trainer == "attach":
                out.losses = train_attach(scale, seed, run, sink)
            else:
                out.losses = train_hf(case.trainer.removeprefix("hf-"), scale, seed, run, sink)
        except Exception as exc:  # a run that crashes is a result too, not the zoo's end
            out.error = f"{type(exc).__name__}: {exc}"
    out.seconds = time.perf_counter() - start
    out.series = _plotted(memory)
    return out


def _on_report(step: float, every: int) -> int:
    return max(every, round(step / every) * every)


class _CorruptBatches:
    """While open, the trainer samples random bytes at ``steps`` (its n-th sample is step n).

    The worker process is reused for the next run, so ``close`` puts the real sampler back.
    """

    def __init__(self, steps: list[int]) -> None:
        import importlib

        import torch

        # The module, not the function that logitwatch.agent re-exports under the same name.
        trainer = importlib.import_module("logitwatch.agent.reference.train")
        self.trainer, self.original = trainer, trainer.BatchSampler
        if not steps:
            return
        wanted = set(steps)

        class Corrupting(self.original):
            calls = 0

            def sample(self):
                x, y = super().sample()
                step, self.calls = self.calls, self.calls + 1
                if step not in wanted:
                    return x, y
                gen = torch.Generator().manual_seed(step)
                rows = torch.randint(0, 256, (x.shape[0], x.shape[1] + 1), generator=gen)
                rows = rows.to(x.device)
                return rows[:, :-1], rows[:, 1:]

        trainer.BatchSampler = Corrupting

    def close(self) -> None:
        self.trainer.BatchSampler = self.original


def _scale_lr(optimizer: Any, scale: float) -> None:
    """Each step runs at ``scale`` x the scheduler's LR: what a resume with a wrong LR does.

    The closed-form scheduler rewrites every group's LR after each step, so the hook scales it
    again just before the next one; the run's declared schedule stays the checkpoint's.
    """

    def hook(opt, args, kwargs):
        for group in opt.param_groups:
            group["lr"] = group["lr"] * scale

    optimizer.register_step_pre_hook(hook)


def _plotted(memory: Any) -> dict[str, dict[str, list[list[float]]]]:
    """{metric: {labels text: [steps, values]}} for the plotted metrics (global and per layer)."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for metric, labels in sorted(memory.keys()):
        if metric not in PLOTTED:
            continue
        steps, values = memory.series(metric, **dict(labels))
        text = ",".join(f"{k}={v}" for k, v in labels)
        out.setdefault(metric, {})[text] = [steps, [_finite(v) for v in values]]
    return out


def _finite(v: float) -> float:
    return v if math.isfinite(v) else float("nan")
