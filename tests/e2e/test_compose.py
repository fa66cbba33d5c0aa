"""docker-compose.yml and the Dockerfile, checked as far as a machine without Docker can.

Valid against the Compose Specification's schema; every mounted file and build context
exists; ports and URLs agree across compose, the service's settings, prometheus.yml,
alertmanager.yml (which amtool checks) and Grafana's provisioning; and the service starts
with exactly the environment compose (and the image) give it, its database pointed at the
local PostgreSQL.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import yaml
from helpers.alertmanager import AMTOOL, binary
from helpers.answers import json_of
from helpers.pg import fresh_database
from helpers.server import free_port, wait_ready
from sqlalchemy.engine import make_url

from logitwatch.service.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).parent / "compose_spec" / "compose-spec.json"
USER_ENV = {"GRAFANA_ADMIN_PASSWORD": "s3cret"}  # what a user sets; everything else has defaults
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $VAR and $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        have = env.get(name)
        unset = have is None or (have == "" and op and op.startswith(":"))
        if op and op.endswith("?") and unset:
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return have or ""

    return _VAR.sub(one, value)


def compose(env: dict[str, str] = USER_ENV) -> dict:
    return interpolate(yaml.safe_load((REPO / "docker-compose.yml").read_text()), env)


def dockerfile() -> dict[str, dict]:
    """Stages of the Dockerfile: {name: {"from", "env", "cmd", "healthcheck", "copy"}}."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, dict] = {}
    cur: dict = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "FROM":
            base, _, name = rest.partition(" AS ")
            parent = stages.get(base.strip(), {"env": {}})
            cur = {"from": base.strip(), "env": dict(parent["env"]), "copy": []}
            stages[name.strip()] = cur
        elif word == "ENV":
            cur["env"].update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
        elif word == "CMD":
            cur["cmd"] = json.loads(rest)
        elif word == "HEALTHCHECK":
            cur["healthcheck"] = json.loads(rest.split(" CMD ", 1)[1])
        elif word == "COPY":
            cur["copy"].extend(shlex.split(rest)[:-1])
    return stages


def test_compose_file_is_valid_against_the_compose_spec_schema():
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    raw = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert not [e.message for e in validator.iter_errors(raw)]
    assert not list(validator.iter_errors(compose()))
    # The schema has teeth: an unknown key and a wrongly typed port are both rejected.
    bad = copy.deepcopy(raw)
    bad["services"]["logitwatch"]["helthcheck"] = {"test": "x"}
    bad["services"]["grafana"]["ports"] = {"3000": 3000}
    assert len(list(validator.iter_errors(bad))) >= 2


def test_admin_password_comes_from_the_environment():
    with pytest.raises(ValueError, match="GRAFANA_ADMIN_PASSWORD"):
        compose({})
    grafana = compose()["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == USER_ENV["GRAFANA_ADMIN_PASSWORD"]


def test_mounted_files_build_contexts_and_image_contents_exist():
    services = compose()["services"]
    stages = dockerfile()
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if not source.startswith("."):
                assert source in compose()["volumes"], f"{name}: volume {source} not declared"
                continue
            path = REPO / source
            assert path.exists(), f"{name} mounts missing {source}"
            assert path.is_file() == bool(Path(target).suffix), f"{name}: {source} -> {target}"
        if "build" in svc:
            context = REPO / svc["build"]["context"]
            assert (context / svc["build"].get("dockerfile", "Dockerfile")).is_file()
            assert svc["build"]["target"] in stages, f"{name}: no stage {svc['build']['target']}"
    # What the Dockerfile copies exists and survives .dockerignore (everything else is left out).
    ignore = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()]
    kept = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    assert "*" in ignore
    for src in stages["base"]["copy"]:
        assert (REPO / src).exists() and src.rstrip("/") in kept, src
    assert os.access(REPO / "dashboards/postgres/grafana-reader.sh", os.X_OK)


def test_ports_and_urls_agree_with_settings_prometheus_and_grafana():
    services = compose()["services"]
    lw = services["logitwatch"]
    settings = load_settings(
        **{k.removeprefix("LOGITWATCH_").lower(): v for k, v in lw["environment"].items()}
    )
    assert settings.host == "0.0.0.0"
    assert f"{settings.port}:{settings.port}" in lw["ports"]
    db = make_url(settings.db_url)
    pg = services["postgres"]["environment"]
    assert (db.host, db.port, db.database) == ("postgres", 5432, pg["POSTGRES_DB"])
    assert (db.username, db.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
    health = " ".join(dockerfile()["service"]["healthcheck"])
    assert "/healthz" in health and "LOGITWATCH_PORT" in health

    checked = subprocess.run(
        ["promtool", "check", "config", str(REPO / "dashboards/prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    prom = yaml.safe_load((REPO / "dashboards/prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"logitwatch:{settings.port}"]
    assert "9090:9090" in services["prometheus"]["ports"]
    assert any(
        v.endswith("/etc/prometheus/prometheus.yml:ro") for v in services["prometheus"]["volumes"]
    )

    grafana = services["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    sources = yaml.safe_load(
        (REPO / "dashboards/provisioning/datasources/logitwatch.yaml").read_text()
    )
    by_type = {d["type"]: d for d in sources["datasources"]}
    assert urlsplit(by_type["prometheus"]["url"]).netloc == "prometheus:9090"
    assert by_type["prometheus"]["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    sql = by_type["grafana-postgresql-datasource"]
    assert sql["url"] == "postgres:5432" and sql["jsonData"]["database"] == pg["POSTGRES_DB"]
    for key, var in (("user", sql["user"]), ("password", sql["secureJsonData"]["password"])):
        name = var.lstrip("$")  # Grafana expands $VAR in provisioning files from its environment
        assert grafana["environment"][name] == pg[name], key
    # Every dashboard's data-source variable finds a provisioned source of its type.
    providers = yaml.safe_load(
        (REPO / "dashboards/provisioning/dashboards/logitwatch.yaml").read_text()
    )
    folder = providers["providers"][0]["options"]["path"]
    boards = sorted((REPO / "dashboards").glob("*.json"))
    for board in boards:
        assert mounts[f"{folder}/{board.name}"] == f"./dashboards/{board.name}"
        for var in json.loads(board.read_text())["templating"]["list"]:
            if var["type"] == "datasource":
                assert var["query"] in by_type, (board.name, var["query"])
    assert (
        mounts["/etc/grafana/provisioning/datasources"] == "./dashboards/provisioning/datasources"
    )
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in mounts
    assert "3000:3000" in grafana["ports"]
    assert urlsplit(settings.dashboard_url).port == 3000
    assert services["demo"]["command"][-1] == f"http://logitwatch:{settings.port}"


def test_alertmanager_is_wired_to_the_service_and_its_config_checks():
    services = compose()["services"]
    lw, am = services["logitwatch"], services["alertmanager"]
    settings = load_settings(
        **{k.removeprefix("LOGITWATCH_").lower(): v for k, v in lw["environment"].items()}
    )
    target = urlsplit(settings.alertmanager_url)
    assert (target.scheme, target.hostname, target.port) == ("http", "alertmanager", 9093)
    assert "9093:9093" in am["ports"] and am["image"].startswith("prom/alertmanager:v")
    flags = dict(f.removeprefix("--").split("=", 1) for f in am["command"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in am["volumes"]}
    assert mounts[flags["config.file"]] == "./dashboards/alertmanager.yml"
    assert mounts[flags["storage.path"]] in compose()["volumes"]
    assert flags["cluster.listen-address"] == ""  # a single instance gossips with no one

    path = REPO / "dashboards/alertmanager.yml"
    checked = subprocess.run(
        [binary(AMTOOL), "check-config", str(path)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(path.read_text())
    # It groups, routes and inhibits on labels logitwatch sends, and hears when alerts end.
    sent = {"alertname", "run", "severity", "metric"}
    routes = [config["route"], *config["route"].get("routes", [])]
    matchers = [m for r in routes for m in r.get("matchers", [])]
    for rule in config.get("inhibit_rules", []):
        matchers += rule["source_matchers"] + rule["target_matchers"]
        assert set(rule["equal"]) <= sent
    assert {re.match(r"\w+", m).group(0) for m in matchers} <= sent, matchers
    assert set(config["route"]["group_by"]) <= sent
    hooks = [w for r in config["receivers"] for w in r.get("webhook_configs", [])]
    assert hooks and all(w["send_resolved"] for w in hooks)


def test_service_starts_with_exactly_the_compose_environment(tmp_path):
    stage = dockerfile()["service"]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    env.update(stage["env"])
    env.update(compose()["services"]["logitwatch"]["environment"])
    port = free_port()
    with fresh_database("lwtest_compose") as url:
        # Only where compose's network differs from this machine: the database and the port.
        env.update(LOGITWATCH_DB_URL=url, LOGITWATCH_HOST="127.0.0.1", LOGITWATCH_PORT=str(port))
        log = tmp_path / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(stage["cmd"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, 60, proc, log=log)
            assert json_of(httpx.get(f"{base}/readyz"))["status"] == "ready"
            assert "logitwatch_" in httpx.get(f"{base}/metrics").text
            check = subprocess.run(stage["healthcheck"], env=env, capture_output=True, timeout=30)
            assert check.returncode == 0, check.stderr
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    out = log.read_text()
    assert f"serving on http://127.0.0.1:{port}" in out and "2 workers" in out, out
