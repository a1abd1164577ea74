"""The FastAPI application: validates and enqueues; never imports torch.

Run it with `uvicorn --factory app.main:create_app`: settings are read when the app is created, not at import."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request

from app.api import problems
from app.api.deps import Services
from app.api.routes import checkpoints, health, merges, methods
from app.core.config import Settings, get_settings
from app.core.metrics import Metrics
from workers.engine import __version__

DESCRIPTION = """Model merging as a service. Submit merge jobs that reference stored checkpoints (safetensors,
Hugging Face layout, `s3://` or `file://`), poll or stream their progress, cancel them, and fetch the merged model
and its manifest. Errors are RFC 9457 problem details (`application/problem+json`) with a stable `code`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(title="MergeForge", version=__version__, description=DESCRIPTION,
                  openapi_tags=[{"name": "merges"}, {"name": "checkpoints"}, {"name": "methods"},
                                {"name": "health"}])
    app.state.services = Services(settings or get_settings())
    app.state.metrics = Metrics()
    problems.install(app)
    problems.document(app)
    for router in (merges.router, checkpoints.router, methods.router, health.router):
        app.include_router(router)

    limit = app.state.services.settings.max_body_bytes

    @app.middleware("http")
    async def _count(request: Request, call_next):
        started = time.perf_counter()
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            response = problems.problem_response(request, 413, "payload_too_large",
                                                 f"request bodies are limited to {limit} bytes")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        app.state.metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        app.state.metrics.latency.labels(request.method, path).observe(time.perf_counter() - started)
        return response

    return app
