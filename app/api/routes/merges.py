"""Merge jobs: create (idempotent), read, list, cancel, delete, progress events, artifacts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from app.api.deps import ServicesDep, TenantDep
from app.api.models import ArtifactFile, ArtifactsOut, EventList, JobList, JobOut, MergeRequest
from app.api.problems import ApiProblem, responses
from app.core.checkpoints import tensor_infos
from app.core.config import Settings
from app.core.jobstore import (
    TERMINAL,
    Event,
    IdempotencyConflict,
    JobError,
    JobRecord,
    JobStore,
    Status,
    TooManyActiveJobs,
    is_checkpoint_id,
    new_id,
    now,
)
from app.core.storage import StorageError, check_uri, join, within
from app.core.webhooks import WebhookRefused, check_target
from workers.celery_app import MERGE_TASK, WEBHOOK_TASK
from workers.engine.errors import EngineError
from workers.engine.layout import plan_layout

router = APIRouter(prefix="/v1/merges", tags=["merges"], responses=responses(401, 422, 429))
CURSOR = r"^[0-9]{1,20}-[0-9]{1,20}$"


def _cursor(value: str | None) -> str | None:
    """Event ids are Redis stream ids: two unsigned 64-bit integers."""
    if value is not None and any(int(part) >= 2**64 for part in value.split("-")):
        raise ApiProblem(422, "invalid_parameters", f"{value} is not an event id")
    return value


def _allowed_file(settings: Settings, uri: str) -> bool:
    path = Path(urlparse(uri).path)
    roots = list(settings.file_roots)
    if settings.storage_url.startswith("file://"):
        roots.append(Path(urlparse(settings.storage_url).path))
    return any(path == root or root in path.parents for root in roots)


def check_input_uri(settings: Settings, tenant: str, uri: str, field: str) -> str:
    """A URI a tenant may name: canonical, inside the allowed file roots, and inside the service's own storage
    only under that tenant's prefix."""
    try:
        check_uri(uri)
    except StorageError as exc:
        raise ApiProblem(422, "invalid_parameters", f"{field}: {exc}") from None
    if uri.startswith("file://") and not _allowed_file(settings, uri):
        raise ApiProblem(422, "invalid_parameters", f"{field}: {uri} is outside the folders this service may read "
                         "(MERGEFORGE_FILE_ROOTS)")
    if uri.startswith("s3://") and settings.s3_buckets:
        bucket = urlparse(uri).netloc
        allowed = {*settings.s3_buckets, urlparse(settings.storage_url).netloc}
        if bucket not in allowed:
            raise ApiProblem(422, "invalid_parameters", f"{field}: bucket {bucket!r} is not one this service may use "
                             "(MERGEFORGE_S3_BUCKETS)")
    own = join(settings.storage_url, tenant)
    if within(uri, settings.storage_url) and not within(uri, own):
        raise ApiProblem(422, "invalid_parameters", f"{field}: inside the service's storage, a tenant names only "
                         f"{own}/...")
    return uri


def _output_prefix(settings: Settings, tenant: str, output: str | None, job_id: str) -> str:
    if output is None:
        return join(settings.storage_url, tenant, job_id)
    return join(check_input_uri(settings, tenant, output, "output"), job_id)


def _job(store: JobStore, tenant: str, job_id: str) -> JobRecord:
    job = store.get(job_id)
    if job is None or job.tenant != tenant:
        raise ApiProblem(404, "not_found", f"no merge job {job_id}")
    return job


def _out(job: JobRecord) -> JobOut:
    return JobOut.model_validate(job.model_dump())


def _check_registered(store: JobStore, tenant: str, body: MergeRequest) -> None:
    """Resolve checkpoint ids and, when every input is registered, refuse incompatible ones now."""
    records = {}
    for ref in [body.base_model, *(m.model for m in body.models)]:
        if is_checkpoint_id(ref):
            record = store.get_checkpoint(ref)
            if record is None or record.tenant != tenant:
                raise ApiProblem(422, "input_not_found", f"no registered checkpoint {ref}")
            records[ref] = record
    if body.base_model in records and all(m.model in records for m in body.models):
        try:
            plan_layout(body, tensor_infos(records[body.base_model].tensors),
                        [tensor_infos(records[m.model].tensors) for m in body.models])
        except EngineError as exc:
            raise ApiProblem(422, exc.code.value, exc.message, [exc.detail]) from None


@router.post("", status_code=202, response_model=JobOut, summary="Submit a merge job",
             responses={202: {"headers": {"Location": {"schema": {"type": "string"}}}},
                        **responses(400, 413, 503)})
def create_merge(body: MergeRequest, svc: ServicesDep, tenant: TenantDep, response: Response,
                 idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobOut:
    settings, store = svc.settings, svc.store
    for i, ref in enumerate([body.base_model, *(m.model for m in body.models)]):
        if not is_checkpoint_id(ref):
            check_input_uri(settings, tenant, ref, "base_model" if i == 0 else f"models.{i - 1}.model")
    for i, m in enumerate(body.models):
        if m.data is not None:
            check_input_uri(settings, tenant, m.data, f"models.{i}.data")
    _check_registered(store, tenant, body)
    if body.webhook_url is not None:
        try:
            check_target(str(body.webhook_url), settings.webhook_allow_private)
        except WebhookRefused as exc:
            raise ApiProblem(422, "invalid_parameters", f"webhook_url: {exc}") from None
    job_id = new_id("mrg")
    spec = body.model_dump(mode="json", by_alias=True, exclude={"output", "metadata", "webhook_url", "webhook_secret"})
    secret = body.webhook_secret.get_secret_value() if body.webhook_secret else None
    body_hash = hashlib.sha256(json.dumps([body.model_dump(mode="json", by_alias=True), secret], sort_keys=True)
                               .encode()).hexdigest()
    record = JobRecord(id=job_id, tenant=tenant, created_at=now(), spec=spec, queue=settings.queue_for(body.method),
                       output=_output_prefix(settings, tenant, body.output, job_id), metadata=body.metadata,
                       webhook_url=str(body.webhook_url) if body.webhook_url else None, webhook_secret=secret)
    try:
        job, created = store.create(record, idempotency_key, body_hash, settings.max_active_jobs)
    except IdempotencyConflict:
        raise ApiProblem(422, "idempotency_key_reused", "this Idempotency-Key was used with a different body") from None
    except TooManyActiveJobs:
        raise ApiProblem(429, "too_many_jobs", f"this tenant has {settings.max_active_jobs} jobs queued or running, "
                         "its limit: wait for some to end or cancel some", headers={"Retry-After": "30"}) from None
    if created:
        try:
            svc.celery.send_task(MERGE_TASK, args=[job.id], queue=job.queue)
        except Exception as exc:
            store.update(job.id, status=Status.FAILED, stage="failed", finished_at=now(),
                         error=JobError(code="internal", message=f"could not enqueue: {exc}"))
            raise ApiProblem(503, "queue_unavailable", "the job queue is unavailable; try again") from None
    response.headers["Location"] = f"/v1/merges/{job.id}"
    return _out(job)


@router.get("", response_model=JobList, summary="List merge jobs, newest first")
def list_merges(svc: ServicesDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                after: Annotated[str | None, Query(max_length=64)] = None,
                status: Status | None = None) -> JobList:
    jobs = svc.store.list(tenant, status, limit, after)
    return JobList(items=[_out(j) for j in jobs], next=jobs[-1].id if len(jobs) == limit else None)


@router.get("/{job_id}", response_model=JobOut, summary="Read a merge job", responses=responses(404))
def get_merge(job_id: str, svc: ServicesDep, tenant: TenantDep) -> JobOut:
    return _out(_job(svc.store, tenant, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a merge job",
             responses=responses(404, 409))
def cancel_merge(job_id: str, svc: ServicesDep, tenant: TenantDep) -> JobOut:
    job = _job(svc.store, tenant, job_id)
    if job.status in TERMINAL:
        raise ApiProblem(409, "conflict", f"job {job_id} already ended ({job.status.value})")
    updated = svc.store.request_cancel(job_id)
    if updated is not None and updated.status == Status.CANCELLED and updated.webhook_url:
        svc.celery.send_task(WEBHOOK_TASK, args=[job_id], queue=updated.queue)
    return _out(updated or _job(svc.store, tenant, job_id))


@router.delete("/{job_id}", status_code=204, summary="Delete an ended job and its artifacts",
               responses=responses(404, 409))
def delete_merge(job_id: str, svc: ServicesDep, tenant: TenantDep) -> Response:
    job = _job(svc.store, tenant, job_id)
    if job.status not in TERMINAL:
        raise ApiProblem(409, "conflict", f"job {job_id} is {job.status.value}; cancel it first")
    svc.storages.for_uri(job.output).delete_prefix(job.output)
    svc.store.delete(job)
    return Response(status_code=204)


@router.get("/{job_id}/events", response_model=EventList, summary="Progress events, oldest first",
            responses=responses(404))
def list_events(job_id: str, svc: ServicesDep, tenant: TenantDep,
                after: Annotated[str | None, Query(pattern=CURSOR)] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> EventList:
    _job(svc.store, tenant, job_id)
    events = svc.store.events(job_id, _cursor(after), limit)
    return EventList(items=events, next=events[-1].id if len(events) == limit else None)


@router.get("/{job_id}/events/stream", summary="Progress events as Server-Sent Events (resumable)",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, **responses(404)})
async def stream_events(job_id: str, svc: ServicesDep, tenant: TenantDep,
                        last_event_id: Annotated[str | None, Header(pattern=CURSOR)] = None) -> StreamingResponse:
    feed = svc.feed
    job = await feed.job(job_id)
    if job is None or job.tenant != tenant:
        raise ApiProblem(404, "not_found", f"no merge job {job_id}")
    _cursor(last_event_id)

    def frame(event: Event) -> str:
        return f"id: {event.id}\nevent: progress\ndata: {event.model_dump_json()}\n\n"

    async def frames() -> AsyncIterator[str]:
        cursor = last_event_id
        # A job's record and its status event change in one transaction: once the record shows an ended job, the
        # terminal event is stored, so replaying after that check cannot miss it.
        while True:
            job = await feed.job(job_id)
            for event in await feed.events(job_id, cursor, 10_000):
                cursor = event.id
                yield frame(event)
                if event.status in TERMINAL:
                    return
            if job is None or job.status in TERMINAL:
                return
            while fresh := await feed.wait(job_id, cursor):
                for event in fresh:
                    cursor = event.id
                    yield frame(event)
                    if event.status in TERMINAL:
                        return
            yield ": keep-alive\n\n"  # quiet for a while: keep the connection alive, then re-check the record

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/artifacts", response_model=ArtifactsOut, summary="The manifest and a URL per file",
            responses=responses(404, 409))
def get_artifacts(job_id: str, svc: ServicesDep, tenant: TenantDep) -> ArtifactsOut:
    job = _job(svc.store, tenant, job_id)
    if job.status != Status.SUCCEEDED or not job.artifacts_prefix:
        raise ApiProblem(409, "conflict", f"job {job_id} is {job.status.value}; artifacts exist once it succeeded")
    storage = svc.storages.for_uri(job.artifacts_prefix)
    manifest_uri = join(job.artifacts_prefix, "merge_manifest.json")
    manifest = json.loads(storage.read_range(manifest_uri, 0, storage.size(manifest_uri)))
    files = [ArtifactFile(path=a.path, size=a.size, sha256=a.sha256, uri=a.uri,
                          url=storage.presign(a.uri) or f"/v1/merges/{job_id}/artifacts/{a.path}")
             for a in job.artifacts]
    return ArtifactsOut(job_id=job_id, prefix=job.artifacts_prefix, manifest=manifest, files=files)


@router.get("/{job_id}/artifacts/{path:path}", summary="Download one artifact file",
            response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 307: {"description": "Presigned URL"},
                       **responses(404)})
def download_artifact(job_id: str, path: str, svc: ServicesDep, tenant: TenantDep) -> Response:
    job = _job(svc.store, tenant, job_id)
    artifact = next((a for a in job.artifacts if a.path == path), None)
    if job.status != Status.SUCCEEDED or artifact is None:
        raise ApiProblem(404, "not_found", f"no artifact {path} in job {job_id}")
    url = svc.storages.for_uri(artifact.uri).presign(artifact.uri)
    if url:
        return RedirectResponse(url, status_code=307)
    return FileResponse(urlparse(artifact.uri).path, filename=Path(path).name)
