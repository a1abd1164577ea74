"""Per-process services and the request's tenant."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated

from fastapi import Depends, Request

from app.api.problems import ApiProblem
from app.core.config import Settings, hash_key
from app.core.eventfeed import EventFeed
from app.core.jobstore import JobStore
from app.core.storage import Storages


@dataclass
class Services:
    settings: Settings

    @cached_property
    def store(self) -> JobStore:
        return JobStore.from_url(self.settings.redis_url, event_ttl_s=self.settings.event_ttl_s,
                                 idempotency_ttl_s=self.settings.idempotency_ttl_s)

    @cached_property
    def feed(self) -> EventFeed:
        return EventFeed.from_url(self.settings.redis_url)

    @cached_property
    def storages(self) -> Storages:
        return Storages(self.settings)

    @cached_property
    def celery(self):
        from workers.celery_app import celery_app

        return celery_app


def services(request: Request) -> Services:
    return request.app.state.services


def tenant(request: Request, svc: Annotated[Services, Depends(services)]) -> str:
    """The tenant of the request's API key, within its request budget. A tenant never sees another's resources:
    those answer 404."""
    name = _authenticated(request, svc.settings)
    limit = svc.settings.rate_limit_per_minute
    if limit is not None:
        count, retry_after = svc.store.count_request(name)
        if count > limit:
            raise ApiProblem(429, "rate_limited", f"more than {limit} requests this minute; retry in {retry_after} s",
                             headers={"Retry-After": str(retry_after)})
    return name


def _authenticated(request: Request, settings: Settings) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() == "bearer" and key:
        digest = hash_key(key.strip())
        for known, name in settings.api_keys.items():
            if hmac.compare_digest(known, digest):
                return name
        raise ApiProblem(401, "unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    if settings.allow_anonymous:
        return "default"
    raise ApiProblem(401, "unauthorized", "send Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"})


ServicesDep = Annotated[Services, Depends(services)]
TenantDep = Annotated[str, Depends(tenant)]
