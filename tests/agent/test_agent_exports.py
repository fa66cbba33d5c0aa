"""The agent's public surface is pinned: a name added or dropped is a decision, not an accident."""

import logitwatch.agent as agent

PUBLIC = [
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


def test_all_is_pinned_and_sorted():
    assert agent.__all__ == PUBLIC
    assert agent.__all__ == sorted(agent.__all__, key=lambda n: (not n.isupper(), n))


def test_every_public_name_resolves():
    for name in PUBLIC:
        assert getattr(agent, name) is not None, name
