"""The agent's `logitwatch` subcommands: train, presets, lint, sync, zoo."""
