"""logitwatch.agent: what runs inside the training process (needs torch, never the service)."""

from logitwatch.agent.actions import Checkpoint, LocalGuard, LowerLR, StopTraining
from logitwatch.agent.attach import attach
from logitwatch.agent.decoder import Decoder, DecoderConfig, HookPoint, loss_fn
from logitwatch.agent.filesink import FileSink
from logitwatch.agent.monitor import Monitor, MonitorConfig
from logitwatch.agent.optim import build_optimizer
from logitwatch.agent.presets import PRESETS, get_preset
from logitwatch.agent.schedule import SGDR, WarmupCosine, build_scheduler
from logitwatch.agent.sender import HttpSink, SenderConfig
from logitwatch.agent.train import TrainConfig, train

__all__ = [
    "PRESETS",
    "SGDR",
    "Checkpoint",
    "Decoder",
    "DecoderConfig",
    "FileSink",
    "HookPoint",
    "HttpSink",
    "LocalGuard",
    "LogitwatchCallback",
    "LogitwatchLightningCallback",
    "LowerLR",
    "Monitor",
    "MonitorConfig",
    "SenderConfig",
    "StopTraining",
    "TrainConfig",
    "WarmupCosine",
    "attach",
    "build_optimizer",
    "build_scheduler",
    "get_preset",
    "loss_fn",
    "train",
]


def __getattr__(name: str):
    # Lazy: importing transformers or lightning takes seconds; only their users pay for it.
    if name == "LogitwatchCallback":
        from logitwatch.agent.hf import LogitwatchCallback

        return LogitwatchCallback
    if name == "LogitwatchLightningCallback":
        from logitwatch.agent.lightning import LogitwatchLightningCallback

        return LogitwatchLightningCallback
    raise AttributeError(f"module 'logitwatch.agent' has no attribute {name!r}")
