"""The parts stay apart: the agent never pulls in the server stack, the service never torch."""

import subprocess
import sys

import pytest


def _imported(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in out.stdout.split()}


@pytest.mark.parametrize("forbidden", ["fastapi", "sqlalchemy", "uvicorn", "alembic", "starlette"])
def test_agent_does_not_import_service_stack(forbidden):
    assert forbidden not in _imported("logitwatch.agent")


def test_service_does_not_import_torch():
    mods = _imported("logitwatch.service")
    assert "torch" not in mods


def test_core_imports_only_small_deps():
    mods = _imported("logitwatch.protocol") | _imported("logitwatch.metrics")
    assert not mods & {"torch", "fastapi", "sqlalchemy", "numpy"}


def test_cli_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "logitwatch", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "train" in out.stdout and "serve" in out.stdout
