"""The API's layers: endpoints get what they need from the deps module, never from app.state,
and no router borrows a helper from another router."""

import ast
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[2] / "service" / "api"
ROUTERS = sorted((API / "routes").glob("*.py"))


def _state_reads(path: Path) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr == "state"
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "app"
    ]


@pytest.mark.parametrize(
    "path", [*ROUTERS, API / "auth.py", API / "render.py"], ids=lambda p: p.name
)
def test_endpoints_do_not_reach_into_app_state(path):
    assert not _state_reads(path), f"{path.name} reads request.app.state"


def test_deps_is_where_app_state_is_read():
    assert _state_reads(API / "deps.py")


@pytest.mark.parametrize("path", ROUTERS, ids=lambda p: p.name)
def test_routers_do_not_import_each_other(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("logitwatch.service.api.routes"), node.module


def test_every_dependency_is_an_annotated_alias():
    from typing import Annotated, get_args, get_origin

    from logitwatch.service.api import deps

    aliases = [n for n in deps.__all__ if n.endswith("Dep")]
    assert {"SettingsDep", "SessionDep", "WriterDep", "RulesDep", "CompactorDep"} <= set(aliases)
    for name in aliases:
        alias = getattr(deps, name)
        assert get_origin(alias) is Annotated, name
        assert len(get_args(alias)) == 2, name
