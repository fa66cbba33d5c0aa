"""On-device probes: where they attach (hooks, Hugging Face attention), the reductions, optimizer-side norms."""
