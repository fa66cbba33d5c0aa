"""logitwatch.agent: what runs inside the training process (needs torch, never the service)."""

__all__: list[str] = []
