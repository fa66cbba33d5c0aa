"""Every route of an app with the scope its require() dependency asks for (auth tests)."""

from __future__ import annotations

from fastapi.routing import APIRoute

__all__ = ["routes_of"]


def _scope_of(route: APIRoute) -> str | None:
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if hasattr(dep.call, "scope"):
            return dep.call.scope
        stack.extend(dep.dependencies)
    return None


def _walk(routes, prefix: str = ""):
    for route in routes:
        if hasattr(route, "original_router"):  # an included router, kept nested
            yield from _walk(route.original_router.routes, prefix + route.include_context.prefix)
        elif hasattr(route, "methods") and hasattr(route, "path"):
            yield prefix + route.path, route


def routes_of(app) -> list[tuple[str, str, str | None]]:
    """(method, path template, scope or None for open routes) for every route of the app."""
    out = []
    for template, route in _walk(app.routes):
        scope = _scope_of(route) if isinstance(route, APIRoute) else None
        for method in sorted(route.methods - {"HEAD"}):
            out.append((method, template, scope))
    return out
