"""The Monitor on the training thread: its config, probes attached to a model, the reporting step, alert actions."""
