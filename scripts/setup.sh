#!/usr/bin/env bash
# Set up everything logitwatch needs on a fresh Debian machine: a virtual environment in
# .venv with torch 2.13.0 (CPU build) installed first, the package with all extras, and
# Debian's prometheus, prometheus-alertmanager and chromium (for the Prometheus, Alertmanager
# and /docs tests). Safe to run again: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian's prometheus" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
        # Debian starts a system prometheus on :9090; the tests run their own.
        (service prometheus stop || pkill -x prometheus || true) >/dev/null 2>&1
    else
        echo "setup: prometheus not found and not root; Prometheus tests will fail" >&2
    fi
fi

# Debian's prometheus-alertmanager (and amtool): the Alertmanager tests post to a live one.
if ! command -v prometheus-alertmanager >/dev/null 2>&1 || ! command -v amtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian's prometheus-alertmanager" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus-alertmanager >/dev/null
        # Debian starts a system alertmanager on :9093 (as user prometheus; the kernel keeps
        # 15 characters of its name); the tests run their own.
        (service prometheus-alertmanager stop || pkill -u prometheus -x prometheus-aler || true) >/dev/null 2>&1
    else
        echo "setup: prometheus-alertmanager not found and not root; Alertmanager tests will fail" >&2
    fi
fi

# Headless Chromium: tests/service/test_docs_offline.py renders /docs in it with no network.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian's chromium" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "setup: chromium not found and not root; the /docs browser test will fail" >&2
    fi
fi

# PostgreSQL: started before sessions and CI; start it if it is down.
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if [ "$(id -u)" = 0 ] && [ -d /etc/postgresql ]; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
    fi
fi

# Grafana's published dashboard schema and tsc, for tests/dashboards/test_schema.py.
if [ ! -f .cache/npm/node_modules/@grafana/schema/package.json ] || [ ! -f .cache/npm/node_modules/typescript/bin/tsc ]; then
    if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    fi
    npm install --silent --no-audit --no-fund --prefix .cache/npm @grafana/schema@13.2.3 typescript@5.9.3
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.logitwatch-setup"
want="$(cat pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing torch 2.13.0 and logitwatch[all] into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    # torch first, pinned: a looser requirement can pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -e '.[all]'
    echo "$want" > "$stamp"
fi
