"""A plain training loop for the reference decoder on the stdlib corpus, CPU or CUDA.

sample -> forward (optional bf16 or fp16 autocast) -> ce + z-loss -> backward -> AdamW step (clips
inside) -> LR step. The host reads the loss only every ``log_every`` steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from logitwatch.agent.monitoring.actions import trainer_actions
from logitwatch.agent.reference.data import BatchSampler, build_corpus
from logitwatch.agent.reference.decoder import Decoder, loss_fn
from logitwatch.agent.reference.optim import build_optimizer
from logitwatch.agent.reference.schedule import build_scheduler
from logitwatch.agent.reference.train_config import TrainConfig
from logitwatch.schedules import ScheduleConfig

__all__ = ["StepInfo", "TrainConfig", "TrainResult", "latest_checkpoint", "train"]


@dataclass
class StepInfo:
    """What a callback sees after each optimizer step (tensors stay on the device)."""

    step: int
    loss: torch.Tensor
    loss_z: torch.Tensor
    lr: float
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class TrainResult:
    start_step: int  # 0, or the checkpoint's step on resume
    end_step: int  # steps completed in total
    losses: list[float]  # train loss (ce + z) of each step run here
    lrs: list[float]
    val_loss: float | None
    tokens_per_s: float  # steady state: after the first log interval when there is more
    seconds: float
    checkpoint: str | None  # the last checkpoint written
    run: str  # the name the monitor reports under (given, the checkpoint's, or made up)
    model: torch.nn.Module = field(repr=False)
    # Points the service did not get before the monitor closed: count, spool, sync command.
    undelivered: Any = None


class _NullMonitor:
    def step(self, step: int, **values: Any) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


def _monitor(
    cfg: TrainConfig, factory: Callable[..., Any] | None, model, optimizer, run, run_config, start
) -> Any:
    if not (cfg.server or cfg.run or cfg.spool):
        return _NullMonitor()
    if factory is None:
        try:
            from logitwatch.agent.monitoring.monitor import Monitor as factory
        except ImportError as exc:
            print(f"logitwatch: warning: monitoring is off ({exc}); training on", file=sys.stderr)
            return _NullMonitor()
    extra: dict[str, Any] = {"spool_dir": cfg.spool} if cfg.spool else {}
    if cfg.param_every is not None:
        from logitwatch.agent.monitoring.config import MonitorConfig

        extra["config"] = MonitorConfig(param_every=cfg.param_every)
    return factory(
        model,
        optimizer,
        run=run,
        server=cfg.server,
        every=cfg.every,
        run_config=run_config,
        start_step=start,
        **extra,
    )


def latest_checkpoint(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if a file, else the highest-step ``step_*.pt`` in that directory."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("step_*.pt"))
        if not found:
            raise ValueError(f"resume: no step_*.pt checkpoint in {str(p)!r}.")
        return found[-1]
    if not p.is_file():
        raise ValueError(f"resume: no checkpoint at {str(p)!r}.")
    return p


def _save(
    path: Path, step: int, cfg: TrainConfig, run: str, model, optimizer, scheduler, sampler
) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,  # optimizer steps completed: the resumed run's first step
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "config": asdict(cfg),
        "run": run,  # a resumed run reports under the same name unless told otherwise
        "decoder": model.config.to_dict(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind
    return str(path)


def _resume(path: str, model, optimizer, scheduler, sampler) -> tuple[int, str | None]:
    state = torch.load(latest_checkpoint(path), map_location="cpu", weights_only=True)
    for key, value in state["decoder"].items():
        if getattr(model.config, key) != value:
            raise ValueError(
                f"resume: the checkpoint has {key}={value!r}, this run asks for "
                f"{getattr(model.config, key)!r}; use the checkpoint's settings."
            )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])  # the checkpoint's schedule, LR for LR
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"]), state.get("run")


def _check_fits(model_cfg, device: torch.device) -> None:
    """Refuse, in one line, a model whose weights, gradients and AdamW moments cannot fit."""
    from logitwatch.agent.reference.presets import preset_params

    need = 16 * preset_params(model_cfg)  # fp32 weights + grads + two moments, 4 bytes each
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(
            f"model: training needs about {need / 2**30:,.0f} GiB for weights, gradients and "
            f"AdamW state, and {device.type} has {have / 2**30:,.0f} GiB; drop --full or shrink it."
        )


@torch.no_grad()
def _evaluate(model, data, cfg: TrainConfig, device, autocast) -> float | None:
    if not cfg.eval_batches:
        return None
    model.eval()
    sampler = BatchSampler(
        data, cfg.batch_size, min(cfg.seq_len, len(data) - 1), seed=1234, device=device
    )
    total = torch.zeros((), device=device)
    for _ in range(cfg.eval_batches):
        x, y = sampler.sample()
        with autocast():
            total += loss_fn(model(x), y, 0.0)[0]
    model.train()
    return float(total) / cfg.eval_batches


def train(
    cfg: TrainConfig,
    *,
    monitor_factory: Callable[..., Any] | None = None,
    callbacks: Iterable[Callable[[StepInfo], Any]] = (),
) -> TrainResult:
    """Train ``cfg``'s decoder; a callback returning True stops the run after that step.

    >>> result = train(TrainConfig(steps=2, batch_size=2, seq_len=16, progress=False,
    ...                            eval_batches=0, corpus_bytes=20_000))
    >>> result.end_step, len(result.losses)
    (2, 2)
    """
    device = torch.device(
        cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.decoder_config()
    _check_fits(model_cfg, device)
    model = Decoder(model_cfg).to(device)
    optimizer = build_optimizer(
        model,
        cfg.lr,
        cfg.weight_decay,
        decay_embeddings=cfg.decay_embeddings,
        clip_grad_norm=cfg.clip_grad_norm,
        eps=cfg.adam_eps,
    )
    scheduler = build_scheduler(optimizer, cfg.schedule_config())
    corpus = build_corpus(cfg.corpus_bytes)
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed, device)
    start, run = (
        _resume(cfg.resume, model, optimizer, scheduler, sampler) if cfg.resume else (0, None)
    )
    run = cfg.run or run or f"{cfg.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if start >= cfg.steps:
        raise ValueError(
            f"steps ({cfg.steps}) must exceed the checkpoint's step ({start}) to continue."
        )
    half = torch.float16 if cfg.fp16 else torch.bfloat16
    autocast = lambda: torch.autocast(device.type, dtype=half, enabled=cfg.bf16 or cfg.fp16)  # noqa: E731
    tokens = cfg.batch_size * cfg.seq_len
    log = _Log(cfg, start, tokens)
    run_config = _run_config(cfg, model_cfg, scheduler, device)
    checkpoint, step = None, start
    monitor = _monitor(cfg, monitor_factory, model, optimizer, run, run_config, start)
    saves = trainer_actions(cfg.on_alert, monitor, optimizer, scheduler)  # checkpoint requests
    with log, _closing(monitor):
        for step in range(start, cfg.steps):
            x, y = sampler.sample()
            with autocast():
                logits = model(x)  # (B, T, V)
            ce, z = loss_fn(logits, y, model_cfg.z_loss)
            loss = ce + z
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()  # clips inside, after the monitor's pre-hook read the raw gradient
            # Before scheduler.step(): the monitor reads the LR this step used, lr_at(schedule, step).
            monitor.step(step, loss=loss.detach(), loss_z=z.detach(), tokens=tokens)
            scheduler.step()
            log.add(loss.detach(), z.detach(), optimizer.last_grad_norm, lr)
            info = StepInfo(step, loss.detach(), z.detach(), lr, model, optimizer)
            stop = any([cb(info) for cb in callbacks]) or getattr(monitor, "should_stop", False)
            last = stop or step + 1 == cfg.steps
            if (step + 1 - start) % cfg.log_every == 0 or last:
                log.flush()
            if saves or (cfg.save_every and ((step + 1) % cfg.save_every == 0 or last)):
                saves.clear()
                path = Path(cfg.save_dir) / f"step_{step + 1:06d}.pt"
                checkpoint = _save(path, step + 1, cfg, run, model, optimizer, scheduler, sampler)
            if stop:
                break
    val = _evaluate(model, corpus.val, cfg, device, autocast)
    return TrainResult(
        start, step + 1, log.losses, log.lrs, val, log.tokens_per_s(), log.seconds(), checkpoint,
        run, model, getattr(monitor, "undelivered", None),
    )  # fmt: skip


def _run_config(cfg: TrainConfig, model_cfg, scheduler, device) -> dict[str, Any]:
    """What the service records about the run; ``schedule`` is the one actually followed."""
    schedule = {**scheduler.shape.to_dict(), "peak_lr": scheduler.base_lrs[0]}
    return {
        "decoder": model_cfg.to_dict(),
        "optimizer": {"name": "adamw", "lr": cfg.lr, "betas": [0.9, 0.95], "eps": cfg.adam_eps,
                      "weight_decay": cfg.weight_decay, "decay_embeddings": cfg.decay_embeddings,
                      "clip_grad_norm": cfg.clip_grad_norm},
        "schedule": ScheduleConfig.from_dict(schedule).to_dict(),
        "train": {"preset": cfg.preset, "full": cfg.full, "steps": cfg.steps,
                  "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "bf16": cfg.bf16,
                  "fp16": cfg.fp16, "seed": cfg.seed, "device": str(device)},
    }  # fmt: skip


def _truncate_metrics(path: Path, start: int) -> None:
    """Drop the lines of steps at or after ``start``: a run that crashed past its last checkpoint
    wrote steps that the resumed run is about to write again."""
    keep = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", -1) < start]  # fmt: skip
    path.write_text("".join(keep))


class _Log:
    """The host side of the loop: per-step tensors wait on the device until ``flush()``, which
    reads them in one sync and feeds the metrics file and the progress bar."""

    def __init__(self, cfg: TrainConfig, start: int, tokens: int) -> None:
        from tqdm.auto import tqdm

        self.start, self.tokens = start, tokens
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.pending: list[torch.Tensor] = []  # (loss, z, grad norm) per unread step
        path = cfg.metrics_out
        if path and start and Path(path).is_file():
            _truncate_metrics(Path(path), start)
        self.file = open(path, "a" if start else "w") if path else None  # noqa: SIM115
        self.bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, unit="step",
                        dynamic_ncols=True)  # fmt: skip
        self.t_start = self.t_last = time.perf_counter()
        self.steady: tuple[float, int] | None = None  # (time, steps) at the first flush

    def add(
        self, loss: torch.Tensor, z: torch.Tensor, norm: torch.Tensor | None, lr: float
    ) -> None:
        norm = torch.zeros((), device=loss.device) if norm is None else norm.to(loss.device)
        self.pending.append(torch.stack([loss.float(), z.float(), norm.float()]))
        self.lrs.append(lr)

    def flush(self) -> None:
        if not self.pending:
            return
        rows = torch.stack(self.pending).tolist()  # the one host sync per interval
        now = time.perf_counter()
        speed = self.tokens * len(rows) / max(now - self.t_last, 1e-9)
        for loss, z, norm in rows:
            step = self.start + len(self.losses)
            self.losses.append(loss)
            if self.file:
                line = {"step": step, "loss": loss, "loss_z": z, "lr": self.lrs[step - self.start],
                        "grad_norm": norm, "tokens_per_s": speed}  # fmt: skip
                self.file.write(json.dumps(line) + "\n")
        if self.file:
            self.file.flush()
        lr = self.lrs[-1]
        self.bar.set_postfix(loss=f"{rows[-1][0]:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}",
                             refresh=False)  # fmt: skip
        self.bar.update(len(rows))
        if self.steady is None:  # the first interval pays for lazy imports and warm-up
            self.steady = (now, len(self.losses))
        self.pending, self.t_last = [], now

    def seconds(self) -> float:
        return self.t_last - self.t_start

    def tokens_per_s(self) -> float:
        """Steady state: from the first flush on, when there was more than one."""
        t0, n0 = (
            self.steady if self.steady and self.steady[1] < len(self.losses) else (self.t_start, 0)
        )
        return self.tokens * (len(self.losses) - n0) / max(self.t_last - t0, 1e-9)

    def __enter__(self) -> _Log:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        if self.file:
            self.file.close()


@contextlib.contextmanager
def _closing(monitor: Any):
    try:
        yield monitor
    finally:
        monitor.close()  # bounded by the monitor's close_timeout_s, waiting for the service
