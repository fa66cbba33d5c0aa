#!/usr/bin/env bash
# Install the benchmarks' peers (MLflow, wandb, TensorBoard) into their own virtual environment,
# .venv-bench, apart from the project's .venv. Safe to run again: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
venv=".venv-bench"
req="benchmarks/requirements-peers.txt"

[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
stamp="$venv/.peers-setup"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup_peers: installing $(grep -v '^#' "$req" | xargs) into $venv" >&2
    # This machine's pip config names local mirrors that may be absent: drop those warnings.
    "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v 'is ignored: it is neither' >&2 || true
    "$venv/bin/python" -m pip install -q -r "$req" 2>&1 | grep -v 'is ignored: it is neither' >&2 || true
    "$venv/bin/python" -c 'import mlflow, wandb, tensorboard'
    echo "$want" > "$stamp"
fi
echo "setup_peers: ready: $venv/bin/python ($("$venv/bin/python" -c 'import mlflow; print("mlflow", mlflow.__version__)'))" >&2
