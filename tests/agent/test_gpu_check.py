"""benchmarks/gpu_check.py, the script a session with a GPU runs, on the CPU: its checks
hold here too (the bf16 autocast path, FSDP2 on one gloo rank), so it is ready to run there."""

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_check")


def test_the_bf16_autocast_max_and_fsdp2_norms_check_out_on_the_cpu(gpu_check):
    size = gpu_check.SIZES["cpu"]
    bf16 = gpu_check.bf16_path("cpu", size, rounds=1)
    assert bf16[0]["check"].startswith("bf16 attention max")
    assert bf16[0]["ok"], bf16[0]["result"]
    assert [r["check"].split(",")[1].split("/")[0].strip() for r in bf16[1:]] == [
        "every=1",
        "every=10",
    ]
    fsdp = gpu_check.fsdp2("cpu", size)
    assert fsdp[0]["ok"], fsdp[0]["result"]
    assert gpu_check.sync_check("cpu", size)["result"].startswith("skipped")
    assert "torch.distributed" not in sys.modules or not _initialized()


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
