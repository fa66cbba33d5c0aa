"""logitwatch.agent: what runs inside the training process (needs torch, never the service)."""

from logitwatch.agent.decoder import Decoder, DecoderConfig, HookPoint, loss_fn

__all__ = ["Decoder", "DecoderConfig", "HookPoint", "loss_fn"]
