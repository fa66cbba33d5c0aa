"""The ``logitwatch`` command: a thin dispatcher to subcommands that live with their part.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their command runs, so ``logitwatch serve`` never imports torch and
``logitwatch train`` never imports fastapi.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "main"]

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("logitwatch.demo", "start the service and stream two demo training runs into it"),
    "train": ("logitwatch.agent.cli.train", "train the reference decoder on the CPU or a GPU"),
    "presets": ("logitwatch.agent.cli.presets", "print the lecture's model table as presets"),
    "lint": ("logitwatch.agent.cli.lint", "check a config against the lecture's consensus"),
    "sync": ("logitwatch.agent.cli.sync", "upload a local spool or metrics file to a service"),
    "zoo": ("logitwatch.agent.cli.zoo", "train the instability zoo and score the rules"),
    "serve": ("logitwatch.service.cli.serve", "run the metrics service"),
    "db": ("logitwatch.service.cli.db", "database maintenance: upgrade, compact, stats"),
    "token": ("logitwatch.service.cli.token", "create, list and revoke API tokens"),
    "runs": ("logitwatch.service.cli.read", "list runs"),
    "series": ("logitwatch.service.cli.read", "list a run's series"),
    "query": ("logitwatch.service.cli.read", "print a metric of a run"),
    "alerts": ("logitwatch.service.cli.read", "list alerts"),
    "plot": ("logitwatch.plot", "draw a run's stability panels and alerts to a PNG"),
    "backtest": (
        "logitwatch.service.cli.backtest",
        "replay stored runs through a rule set: firing steps, lead times, false alarms",
    ),
}


class UsageError(Exception):
    """A bad flag or value: printed as one line, exit status 2, no traceback."""


def _parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(
        prog="logitwatch", description="Training-stability monitor for LLM pre-training."
    )
    parser.add_argument("--version", action="version", version="logitwatch 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (mod_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            try:
                module = importlib.import_module(mod_name)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.startswith("logitwatch"):
                    raise UsageError(
                        f"'{name}' is not available in this build ({exc.name})"
                    ) from None
                raise UsageError(
                    f"'{name}' needs the package '{exc.name}': "
                    f"pip install 'logitwatch[{'service' if '.service.' in mod_name else 'agent'}]'"
                ) from None
            if hasattr(module, "add_arguments"):
                try:
                    module.add_arguments(p, name)
                except TypeError:
                    module.add_arguments(p)
            p.set_defaults(_module=module, _command=name)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, module = _parser(argv)
        args = parser.parse_args(argv)
        if module is None:
            parser.print_help()
            return 0 if not argv else 2
        return int(module.run(args) or 0)
    except UsageError as exc:
        print(f"logitwatch: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # Config validation raises ValueError with a sentence naming the field.
        print(f"logitwatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
