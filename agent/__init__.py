"""logitwatch.agent: what runs inside the training process (needs torch, never the service)."""

from logitwatch.agent.decoder import Decoder, DecoderConfig, HookPoint, loss_fn
from logitwatch.agent.presets import PRESETS, get_preset

__all__ = ["PRESETS", "Decoder", "DecoderConfig", "HookPoint", "get_preset", "loss_fn"]
