"""Stability rules: the rule model, built-ins, conditions, the engine and its per-batch job, state, user rules, absence checks, alerts and notifications."""
