"""The wheel holds every module of logitwatch, agent/ and service/ at its installed path, their
package data, and nothing else (no tests, benchmarks or dashboards): built here, then opened.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> its import path in the installed package (setup.py's package_dir).
PARTS = {"logitwatch": "logitwatch", "agent": "logitwatch/agent", "service": "logitwatch/service"}
PACKAGE_DATA = {
    "logitwatch/service/store/alembic.ini",
    "logitwatch/service/store/migrations/script.py.mako",
}
#: Never copied for the build: the venv, caches, and earlier build output. A stale
#: *.egg-info/SOURCES.txt would feed files into the build that a fresh clone does not have.
ROOT_JUNK = {".git", ".venv", ".venv-bench", ".cache", ".hypothesis", ".pytest_cache",
             ".ruff_cache", ".logitwatch", "build", "dist", "out"}  # fmt: skip


def _ignore(directory: str, names: list[str]) -> set[str]:
    junk = {n for n in names if n == "__pycache__"}
    if Path(directory) == ROOT:
        junk |= {n for n in names if n in ROOT_JUNK or n.endswith(".egg-info")}
    return junk


def _expected() -> set[str]:
    """Every .py file of the three source folders, at its path inside the wheel, and the data."""
    found = set(PACKAGE_DATA)
    for folder, installed in PARTS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                found.add(f"{installed}/{path.relative_to(ROOT / folder).as_posix()}")
    return found


def _check_build_backend() -> None:
    """--no-build-isolation builds with the venv's setuptools (offline); it must be new enough."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for req in map(Requirement, requires):
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or have not in req.specifier:
            pytest.fail(
                f"the venv has {req.name} {have or '(none)'}, pyproject.toml's build needs {req}:"
                f" {sys.executable} -m pip install '{req}'"
            )


def _build_output() -> set[str]:
    return {
        p.name for p in ROOT.iterdir() if p.name in ("build", "dist") or p.suffix == ".egg-info"
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[tuple[zipfile.ZipFile, set[str]]]:
    """(the wheel, build output that appeared in the repository while it was built)."""
    _check_build_backend()
    before = _build_output()
    tmp = tmp_path_factory.mktemp("wheel")
    # A copy: pip builds a local folder in place, leaving build/ and *.egg-info behind.
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=_ignore, symlinks=True)
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
           "--no-index", "--disable-pip-version-check", "-q", "-w", str(out), str(source)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    litter = _build_output() - before
    (path,) = out.glob("logitwatch-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf, litter


def test_wheel_holds_every_module_and_nothing_else(built):
    wheel, _ = built
    names = wheel.namelist()
    (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    files = {n for n in names if not n.startswith(f"{dist_info}/")}
    expected = _expected()
    missing, extra = sorted(expected - files), sorted(files - expected)
    assert not missing, f"left out of the wheel: {missing}"
    assert not extra, f"in the wheel but not part of the package: {extra}"


def test_wheel_installs_the_console_script(built):
    wheel, _ = built
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "logitwatch = logitwatch.cli:main" in wheel.read(entry_points).decode()


def test_build_leaves_no_litter_in_the_repository(built):
    _, litter = built
    assert not litter, f"the wheel build wrote into the repository: {sorted(litter)}"
