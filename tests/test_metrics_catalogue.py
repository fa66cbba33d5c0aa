"""The catalogue's Prometheus names pass promtool's naming lint, and the doctests hold."""

import doctest
import shutil
import subprocess

import logitwatch.metrics as metrics
from logitwatch.metrics import CATALOGUE, prometheus_name


def test_doctests():
    assert doctest.testmod(metrics).failed == 0


def test_every_catalogue_gauge_passes_promtool():
    lines = []
    for name in CATALOGUE:
        prom = prometheus_name(name)
        lines += [f"# HELP {prom} latest {name}", f"# TYPE {prom} gauge", f'{prom}{{run="r"}} 1']
    text = "\n".join(lines) + "\n"
    promtool = shutil.which("promtool") or "promtool"
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_names_are_unique_and_prefixed():
    names = [prometheus_name(n) for n in CATALOGUE]
    assert len(set(names)) == len(names)
    assert all(n.startswith("logitwatch_") for n in names)
