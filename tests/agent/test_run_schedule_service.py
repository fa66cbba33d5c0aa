"""A user loop declares its LR schedule with ``Monitor(run_config=...)``; a real service judges by it."""

import ast
import re
from pathlib import Path

import pytest
import torch
from helpers.server import live_server

from logitwatch.agent import Monitor
from logitwatch.schedules import ScheduleConfig, lr_at
from logitwatch.service.rules.conditions import RunContext

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The README's example, scaled down: every key is a ScheduleConfig field.
SCHEDULE = {
    "kind": "cosine",
    "peak_lr": 1e-2,
    "warmup_steps": 5,
    "total_steps": 40,
    "min_ratio": 0.1,
}
STEPS, OFF_FROM = 30, 15


def run_loop(url, spool, run, run_config, factor):
    """Plain SGD on a regression; from OFF_FROM on the LR is ``factor`` x the schedule's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=SCHEDULE["peak_lr"])
    schedule = ScheduleConfig.from_dict(SCHEDULE)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    with Monitor(
        model, opt, run=run, server=url, every=1, spool_dir=spool, run_config=run_config
    ) as monitor:
        for step in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = lr_at(schedule, step) * (factor if step >= OFF_FROM else 1.0)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(step, loss=loss, tokens=64)
        assert monitor.flush(timeout=30)


def test_the_declared_schedule_reaches_the_rules(tmp_path):
    declared = {"schedule": SCHEDULE}
    with live_server(f"sqlite:///{tmp_path}/lw.db") as server:
        for run, config, factor in (
            ("on-schedule", declared, 1.0),
            ("off-schedule", declared, 3.0),
            ("undeclared", {}, 3.0),  # the same LR with no schedule declared: nothing to judge by
        ):
            run_loop(server.url, tmp_path / "spool", run, config, factor)
        with server.client() as client:
            got = {
                run: client.get(f"/api/v1/runs/{run}").json()["config"]
                for run in ("on-schedule", "off-schedule")
            }
            alerts = {
                run: client.get("/api/v1/alerts", params={"run": run}).json()["alerts"]
                for run in ("on-schedule", "off-schedule", "undeclared")
            }
    assert got == {"on-schedule": declared, "off-schedule": declared}
    off = [a for a in alerts["off-schedule"] if a["rule"] == "lr-off-schedule"]
    assert off and min(a["first_step"] for a in off) >= OFF_FROM
    assert alerts["on-schedule"] == []
    assert not [a for a in alerts["undeclared"] if a["rule"] == "lr-off-schedule"]


def test_the_readme_declares_a_schedule_the_service_reads():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "run_config=" in b]
    (call,) = [n for n in ast.walk(ast.parse(block)) if isinstance(n, ast.Call)]
    (config,) = [ast.literal_eval(k.value) for k in call.keywords if k.arg == "run_config"]
    ctx = RunContext.from_config(config)
    assert ctx.schedule_error is None and ctx.schedule == ScheduleConfig.from_dict(
        config["schedule"]
    )
    assert ctx.warmup_steps == config["schedule"]["warmup_steps"] > 0
