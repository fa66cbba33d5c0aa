"""The HTTP side of the service: routers, dependencies, errors, auth, Prometheus exposition."""
