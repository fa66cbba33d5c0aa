"""logitwatch.agent: what runs inside the training process (needs torch, never the service)."""

from logitwatch.agent.decoder import Decoder, DecoderConfig, HookPoint, loss_fn
from logitwatch.agent.optim import build_optimizer
from logitwatch.agent.presets import PRESETS, get_preset
from logitwatch.agent.schedule import SGDR, WarmupCosine, build_scheduler
from logitwatch.agent.train import TrainConfig, train

__all__ = [
    "PRESETS",
    "SGDR",
    "Decoder",
    "DecoderConfig",
    "HookPoint",
    "TrainConfig",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "get_preset",
    "loss_fn",
    "train",
]
