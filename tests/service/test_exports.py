"""The service's public surface is small and pinned."""

import logitwatch.service as service


def test_public_names():
    assert service.__all__ == ["Settings", "create_app", "load_settings", "make_engine", "upgrade"]
    for name in service.__all__:
        assert getattr(service, name).__name__ == name
