"""Routers of the public API, mounted under /v1 (health and metrics at the root)."""
