"""The parts stay apart: the agent never pulls in the server stack, the service never torch."""

import ast
import subprocess
import sys
from pathlib import Path

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


def test_plot_and_demo_import_matplotlib_only_to_draw():
    mods = _imported("logitwatch.plot") | _imported("logitwatch.demo")
    assert not mods & {"matplotlib", "numpy", "torch", "fastapi"}


def test_cli_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "logitwatch", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "train" in out.stdout and "serve" in out.stdout


# The tree shows the architecture: a folder per seam, a module per concept.
ROOT = Path(__file__).resolve().parents[1]
PARTS = {"agent": "logitwatch.agent", "service": "logitwatch.service"}
SEAMS = {
    "agent": {"monitoring", "probes", "transport", "integrations", "reference", "zoo", "cli"},
    "service": {"api", "store", "rules", "cli"},
}


def _sources(*folders: str) -> list[Path]:
    return sorted(
        p for f in folders for p in (ROOT / f).rglob("*.py") if "__pycache__" not in p.parts
    )


@pytest.mark.parametrize("part", sorted(PARTS))
def test_each_part_is_split_along_its_seams(part):
    root = ROOT / part
    modules = sorted(p.name for p in root.glob("*.py"))
    assert len(modules) <= 5, f"{part}/ keeps only a handful of modules at its root: {modules}"
    packages = {p.parent.name for p in root.glob("*/__init__.py")}
    assert SEAMS[part] <= packages, f"{part}/ lacks {sorted(SEAMS[part] - packages)}"


@pytest.mark.parametrize("folder", ["logitwatch", *sorted(PARTS)])
def test_no_name_prefix_stands_in_for_a_folder(folder):
    # Three modules of one folder sharing a prefix (store_*, zoo_*) are a folder waiting to be made.
    for directory in {p.parent for p in _sources(folder)}:
        stems = [p.stem for p in directory.glob("*.py") if "_" in p.stem.strip("_")]
        prefixes = [s.split("_")[0] for s in stems]
        crowded = {p for p in prefixes if prefixes.count(p) >= 3}
        assert not crowded, f"{directory.relative_to(ROOT)}: {sorted(crowded)}_* modules"


def test_imports_are_absolute():
    relative = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in _sources("logitwatch", *PARTS)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert not relative, f"relative imports: {relative}"


def _is_reexport(node: ast.stmt) -> bool:
    if isinstance(node, ast.Import | ast.ImportFrom):
        return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return True  # the docstring
    if isinstance(node, ast.Assign | ast.AnnAssign):
        # __all__, and the name -> module table a lazy __getattr__ reads
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = all(isinstance(t, ast.Name) for t in targets)
        dunder = all(isinstance(t, ast.Name) and t.id.startswith("__") for t in targets)
        table = isinstance(node.value, ast.List | ast.Dict | ast.Tuple)
        return names and (table or (dunder and isinstance(node.value, ast.Constant)))
    # a lazy __getattr__ (PEP 562), so an optional dependency loads on first use
    return isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__dir__")


def test_init_files_only_reexport():
    for path in _sources("logitwatch", *PARTS):
        if path.name != "__init__.py" or "migrations" in path.parts:
            continue
        extra = [n.lineno for n in ast.parse(path.read_text()).body if not _is_reexport(n)]
        assert not extra, f"{path.relative_to(ROOT)}: code at lines {extra}"


def test_every_subpackage_can_be_imported_without_the_other_part():
    # Each module imports on its own, so a missing __init__ or a cycle shows here, not in the wheel.
    names = []
    for part, package in PARTS.items():
        for path in _sources(part):
            rel = path.relative_to(ROOT / part).with_suffix("")
            if "migrations" in rel.parts:
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            names.append(".".join([package, *parts]))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    out = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr


def test_every_all_names_what_exists():
    # A module's __all__ promises names; a promise to a name that is gone is a stale word.
    code = (
        "import importlib, sys\n"
        "for n in sys.argv[1:]:\n"
        "    m = importlib.import_module(n)\n"
        "    missing = [a for a in getattr(m, '__all__', ()) if not hasattr(m, a)]\n"
        "    assert not missing, f'{n}.__all__ names {missing}'\n"
    )
    names = [
        ".".join([PARTS.get(path.relative_to(ROOT).parts[0], "logitwatch"), *rel])
        for path in _sources("logitwatch", *PARTS)
        if "migrations" not in path.parts and path.name != "__main__.py"
        for rel in [
            [p for p in path.relative_to(ROOT).with_suffix("").parts[1:] if p != "__init__"]
        ]
    ]
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
