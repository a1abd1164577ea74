"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import ServicesDep
from app.api.models import Health
from app.api.problems import PROBLEM_JSON

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, summary="Redis, storage and at least one worker are reachable",
            responses={503: {"content": {PROBLEM_JSON: {}}}})
def readyz(request: Request, svc: ServicesDep) -> Response:
    redis_ok = svc.store.ping()
    checks = {"redis": redis_ok, "storage": svc.storages.default.healthy(svc.settings.storage_url),
              "workers": redis_ok and bool(svc.store.live_workers())}
    if all(checks.values()):
        return JSONResponse(Health(status="ready", checks=checks).model_dump())
    failing = ", ".join(k for k, ok in checks.items() if not ok)
    body = {"type": "https://mergeforge.dev/problems/not_ready", "title": "Service unavailable", "status": 503,
            "detail": f"not ready: {failing}", "instance": request.url.path, "code": "not_ready", "checks": checks}
    return JSONResponse(body, status_code=503, media_type=PROBLEM_JSON)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, svc: ServicesDep) -> Response:
    registry = request.app.state.metrics
    registry.attach(svc.store, svc.settings.queues)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
