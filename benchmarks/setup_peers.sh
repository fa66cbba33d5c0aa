#!/usr/bin/env bash
# Install the benchmarks' peers (MLflow, wandb, TensorBoard, and torch 2.13.0 CPU for TensorBoard's
# torch.utils.tensorboard.SummaryWriter) into their own virtual environment, .venv-bench, apart
# from the project's .venv. Safe to run again: it skips what is done. Also installs py-spy there,
# for profiling the service under benchmarks/ingest.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
venv=".venv-bench"
req="benchmarks/requirements-peers.txt"

[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
stamp="$venv/.peers-setup"
want="$(cat "$req" "$0" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup_peers: installing $(grep -v '^#' "$req" | xargs) into $venv" >&2
    # This machine's pip config names local mirrors that may be absent: drop those warnings.
    "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v 'is ignored: it is neither' >&2 || true
    # torch first, pinned as in scripts/setup.sh: a looser requirement can pull a CUDA build.
    "$venv/bin/python" -m pip install -q torch==2.13.0 2>&1 | grep -v 'is ignored: it is neither' >&2 || true
    "$venv/bin/python" -m pip install -q -r "$req" 2>&1 | grep -v 'is ignored: it is neither' >&2 || true
    "$venv/bin/python" -c 'import mlflow, wandb, tensorboard, torch.utils.tensorboard'
    echo "$want" > "$stamp"
fi
echo "setup_peers: ready: $venv/bin/python ($("$venv/bin/python" -c 'import mlflow; print("mlflow", mlflow.__version__)'))" >&2
