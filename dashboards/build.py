"""Write the Grafana dashboards of logitwatch as JSON: `python dashboards/build.py [--check]`.

The only entry point of this folder: the dashboards are code (fleet.py, deepdive.py, built with
panels.py); the JSON files next to it are what Grafana provisions. `--check` fails when stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a script, Python puts this folder first on sys.path, so the dashboards import as
# top-level modules; they and their builders (panels.py) never import this entry point.
import deepdive
import fleet
from panels import Json

HERE = Path(__file__).resolve().parent


def render(board: Json) -> str:
    return json.dumps(board, indent=2, sort_keys=False) + "\n"


def outputs() -> dict[Path, str]:
    return {
        HERE / "fleet-overview.json": render(fleet.build()),
        HERE / "run-deep-dive.json": render(deepdive.build()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a JSON file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python dashboards/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
