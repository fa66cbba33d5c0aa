"""logitwatch.agent: what runs inside the training process (needs torch, never the service)."""

from logitwatch.agent.monitoring.actions import Checkpoint, LocalGuard, LowerLR, StopTraining
from logitwatch.agent.monitoring.attach import attach
from logitwatch.agent.monitoring.monitor import Monitor, MonitorConfig
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, HookPoint, loss_fn
from logitwatch.agent.reference.optim import build_optimizer
from logitwatch.agent.reference.presets import PRESETS, get_preset
from logitwatch.agent.reference.schedule import SGDR, WarmupCosine, build_scheduler
from logitwatch.agent.reference.train import TrainConfig, train
from logitwatch.agent.transport.filesink import FileSink
from logitwatch.agent.transport.sender import HttpSink, SenderConfig
from logitwatch.agent.transport.tensorboard_sink import TensorBoardSink
from logitwatch.agent.transport.wandb_sink import WandbSink

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
    "TensorBoardSink",
    "TrainConfig",
    "WandbSink",
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
        from logitwatch.agent.integrations.hf import LogitwatchCallback

        return LogitwatchCallback
    if name == "LogitwatchLightningCallback":
        from logitwatch.agent.integrations.lightning import LogitwatchLightningCallback

        return LogitwatchLightningCallback
    raise AttributeError(f"module 'logitwatch.agent' has no attribute {name!r}")
