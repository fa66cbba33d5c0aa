"""One router per resource: health, runs, points, alerts and silences, rules."""
