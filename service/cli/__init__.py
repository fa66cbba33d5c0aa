"""The service's `logitwatch` subcommands: serve, db, token, and the HTTP readers (runs, series, query, alerts)."""
