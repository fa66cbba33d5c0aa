"""Every command in the README is exercised here, so the README never rots.

- the two commands are the ones CI runs;
- every ``curl`` line runs against a live service, in order, and answers what the README says;
- every ``logitwatch`` command line parses with the real CLI; the cheap ones run for real
  (presets, lint, token create, runs/series/query/alerts against the live service); the
  expensive ones (train, demo, serve) are run by their own tests with the same flags;
- the Python snippets run, with a preamble that defines the model and data they assume.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.server import live_server

from logitwatch import cli

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _lines(prefix: str) -> list[str]:
    out = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split(" && "):
                if part.startswith(prefix):
                    out.append(part.strip())
    return out


def test_the_two_commands_are_the_ones_ci_runs():
    lines = [x for x in _blocks("bash")[0].splitlines() if x and not x.startswith("#")]
    first, second = lines
    assert first == "bash scripts/setup.sh && .venv/bin/logitwatch demo"
    assert second == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert second in (ROOT / ".ci/run").read_text()


@pytest.mark.parametrize("line", _lines("logitwatch "), ids=lambda s: s[:60])
def test_every_logitwatch_command_parses(line):
    argv = shlex.split(line)[1:]
    parser, module = cli._parser(argv)
    args = parser.parse_args(argv)  # SystemExit(2) on an unknown flag fails the test
    assert module is not None and args._command == argv[0]


def test_cheap_commands_run_for_real(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOGITWATCH_HOME", str(tmp_path))
    for line in _lines("logitwatch presets") + _lines("logitwatch lint"):
        assert cli.main(shlex.split(line)[1:]) == 0, line
    capsys.readouterr()
    assert cli.main(["lint", "--preset", "t5", "--full"]) == 0
    t5 = capsys.readouterr().out
    assert "16" in t5 and "64" in t5
    (token,) = _lines("logitwatch token create")
    argv = [*shlex.split(token)[1:], "--db", f"sqlite:///{tmp_path}/tokens.db"]
    assert cli.main(argv) == 0
    assert re.search(r"lw_[\w-]{20,}", capsys.readouterr().out)


def _run(line: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    argv = shlex.split(line)
    return subprocess.run(
        [sys.executable, "-m", "logitwatch", *argv[1:]],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_curl_examples_and_read_commands_against_a_live_service(tmp_path):
    curls = _lines("curl ")
    assert len(curls) >= 6
    with live_server(f"sqlite:///{tmp_path}/readme.db") as server:
        host = f"127.0.0.1:{server.port}"
        answers = []
        for line in curls:
            cmd = line.replace("localhost:8000", host)
            out = subprocess.run(
                ["bash", "-c", cmd.replace("curl -s", "curl -sf", 1)],
                capture_output=True,
                text=True,
            )
            assert out.returncode == 0, f"{line}\n{out.stderr}"
            answers.append(out.stdout)
        run, ingest, runs, series, metric, alerts, metrics = answers[:7]
        assert json.loads(run)["config"] == {"lr": 0.003}
        assert json.loads(ingest)["accepted"] == 6
        assert [r["name"] for r in json.loads(runs)["runs"]] == ["readme-run"]
        assert {s["metric"] for s in json.loads(series)["series"]} == {"loss", "attn.logit_max"}
        assert json.loads(metric)["series"][0]["max"] == [3.2, 40.5, 250.0]
        fired = {a["rule"] for a in json.loads(alerts)["alerts"]}
        assert "nonfinite" in fired  # the NaN loss; attn-logit-high (250 > 100) waits for 2 points
        assert 'logitwatch_loss{run="readme-run"}' in metrics
        env = {"LOGITWATCH_SERVER": server.url}
        for prefix in (
            "logitwatch runs",
            "logitwatch series",
            "logitwatch query",
            "logitwatch alerts",
        ):
            for line in _lines(prefix):
                line = line.replace("my-run", "readme-run")
                out = _run(line, env)
                assert out.returncode == 0, f"{line}\n{out.stderr}"
                assert "readme-run" in out.stdout or "attn" in out.stdout or "rule" in out.stdout


def test_compose_commands_match_the_compose_file():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "demo" in compose["services"]
    assert "demo" in compose["services"]["demo"].get("profiles", [])
    assert any("GRAFANA_ADMIN_PASSWORD" in line for line in _lines("GRAFANA_ADMIN_PASSWORD"))


_PREAMBLE = """
import torch
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn

class _Out:
    def __init__(self, loss): self.loss = loss

class Model(Decoder):
    def forward(self, idx):
        logits = super().forward(idx)
        return _Out(loss_fn(logits, idx, 0.0)[0])

model = Model(DecoderConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
loader = [torch.randint(0, 64, (2, 16)) for _ in range(12)]
"""


def test_monitor_snippet_runs_against_a_live_service(tmp_path):
    (snippet,) = [b for b in _blocks("python") if "with Monitor(" in b]
    with live_server(f"sqlite:///{tmp_path}/snippet.db") as server:
        code = _PREAMBLE + snippet.replace("http://127.0.0.1:8000", server.url)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
        )
        assert out.returncode == 0, out.stderr
        with server.client() as c:
            series = c.get("/api/v1/runs/my-run/series").json()["series"]
    metrics = {s["metric"] for s in series}
    assert {"loss", "attn.logit_max", "logz.mean", "grad.norm", "lr"} <= metrics
    assert max(s["last_step"] for s in series if s["metric"] == "loss") == 10


def test_rules_table_lists_every_built_in_rule():
    from logitwatch.service.rules.builtin import builtin_rules

    names = {r.name for r in builtin_rules()}
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", README, flags=re.M))
    assert names <= documented, names - documented


def _script_mentions() -> list[tuple[str, list[str]]]:
    """(script, its --flags) for each benchmark or build script the README names in code."""
    found = []
    for span in re.findall(r"`([^`\n]*?(?:benchmarks|dashboards)/\w+\.py[^`\n]*)`", README):
        words = shlex.split(span)
        (script,) = [w for w in words if w.endswith(".py")]
        found.append((script, [w.split("=")[0] for w in words if w.startswith("--")]))
    return found


@pytest.mark.parametrize("script,flags", _script_mentions(), ids=lambda x: str(x)[:50])
def test_every_script_the_readme_names_takes_its_flags(script, flags):
    path = ROOT / script
    if "*" in script:
        assert list(ROOT.glob(script)), script
        return
    assert path.exists(), script
    out = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    for flag in flags:
        assert flag in out.stdout, f"{script} has no {flag}"
