"""/docs and /redoc render in real headless Chromium with nothing but loopback reachable: their
scripts come from the service; FastAPI's stock CDN page, the control, stays blank there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.openapi.docs import get_swagger_ui_html
from helpers.routes import routes_of
from helpers.server import live_server, thread_server

from logitwatch.service.api.docs import ASSETS_URL, assets_dir
from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings
from logitwatch.service.store.db import upgrade

POINTS = "/api/v1/runs/{run}/points"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.fail(
        "headless Chromium is not installed: run `bash scripts/setup.sh` as root, or"
        " `apt-get install chromium` (Debian), then run this test again"
    )


def render(url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran, with every host but 127.0.0.1 unreachable."""
    cmd = [
        _chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-extensions", f"--user-data-dir={profile}",
        # Offline: names other than 127.0.0.1 do not resolve, and any other connection goes to
        # a proxy on the discard port, where nothing listens.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
        "--virtual-time-budget=10000", "--dump-dom", url,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"chromium failed on {url}:\n{out.stderr[-3000:]}"
    return out.stdout


def swagger_rendered(dom: str) -> bool:
    # Operation blocks exist only once swagger-ui-bundle.js ran and read /openapi.json.
    return "opblock-summary-path" in dom and f'data-path="{POINTS}"' in dom


@pytest.fixture(scope="module")
def db_url(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('docs') / 'lw.db'}"
    upgrade(url)
    return url


def test_docs_and_redoc_render_offline_from_a_real_service(db_url, tmp_path):
    with live_server(db_url) as server:
        docs = render(f"{server.url}/docs", tmp_path / "profile")
        redoc = render(f"{server.url}/redoc", tmp_path / "profile")
        page = server.client().get("/docs").text
    assert "cdn.jsdelivr.net" not in page and f"{ASSETS_URL}/swagger-ui-bundle.js" in page
    assert swagger_rendered(docs), f"Swagger UI did not render offline:\n{docs[-2000:]}"
    assert docs.count("opblock-summary-path") >= 15  # every operation of the API is listed
    # ReDoc draws one section per operation; the bare page holds only <redoc spec-url=...>.
    assert "redoc-wrap" in redoc and 'id="operation/' in redoc and POINTS in redoc


def test_the_cdn_page_stays_blank_offline(db_url, tmp_path):
    # The control: FastAPI's stock page (assets from the CDN) on the same app and browser flags
    # does not render, so the check above can fail.
    app = create_app(load_settings(db_url=db_url))

    async def cdn_docs(request):
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="stock FastAPI docs")

    app.add_route("/docs-cdn", cdn_docs, include_in_schema=False)
    with thread_server(app) as server:
        assert swagger_rendered(render(f"{server.url}/docs", tmp_path / "a"))
        dom = render(f"{server.url}/docs-cdn", tmp_path / "b")
    assert "cdn.jsdelivr.net" in dom and not swagger_rendered(dom)


def test_docs_routes_are_open_even_with_auth(db_url):
    app = create_app(load_settings(db_url=db_url, auth=True))
    routes = {(m, p): scope for m, p, scope in routes_of(app)}
    for path in ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"):
        assert routes[("GET", path)] is None, path
    assert Path(assets_dir(), "swagger-ui-bundle.js").is_file()
    assert Path(assets_dir(), "redoc.standalone.js").is_file()
    with thread_server(app) as server, server.client() as c:
        for path in ("/docs", "/redoc", f"{ASSETS_URL}/swagger-ui.css", "/openapi.json"):
            assert c.get(path).status_code == 200, path
