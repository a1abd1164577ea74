"""Registered checkpoints: the service reads only their safetensors headers (ranged reads) and remembers tensor
names, shapes, dtypes and sizes, so a job naming incompatible checkpoints is refused at submit time."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import ServicesDep, TenantDep
from app.api.models import CheckpointIn, CheckpointList, CheckpointOut
from app.api.problems import ApiProblem, responses
from app.api.routes.merges import check_input_uri
from app.core.checkpoints import describe
from app.core.jobstore import CHECKPOINT_ID, CheckpointRecord, new_id, now
from app.core.storage import StorageError, TransientStorageError
from workers.engine.errors import EngineError

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], responses=responses(401, 422, 429))


def _out(record: CheckpointRecord, with_tensors: bool) -> CheckpointOut:
    return CheckpointOut(id=record.id, uri=record.uri, created_at=record.created_at, size=record.size,
                         files=record.files, tensor_count=len(record.tensors),
                         tensors=record.tensors if with_tensors else None)


@router.post("", status_code=201, response_model=CheckpointOut, summary="Register a stored checkpoint",
             responses=responses(400, 413, 503))
def register_checkpoint(body: CheckpointIn, svc: ServicesDep, tenant: TenantDep, response: Response
                        ) -> CheckpointOut:
    uri = check_input_uri(svc.settings, tenant, body.uri, "uri")
    try:
        described = describe(svc.storages.for_uri(uri), uri)
    except EngineError as exc:
        raise ApiProblem(422, exc.code.value, exc.message, [exc.detail]) from None
    except TransientStorageError as exc:
        raise ApiProblem(503, "storage_unavailable", str(exc)) from None
    except StorageError as exc:
        raise ApiProblem(422, "input_not_found", str(exc)) from None
    record = CheckpointRecord(id=new_id(CHECKPOINT_ID), tenant=tenant, uri=uri, created_at=now(), **described)
    svc.store.put_checkpoint(record)
    response.headers["Location"] = f"/v1/checkpoints/{record.id}"
    return _out(record, with_tensors=True)


@router.get("", response_model=CheckpointList, summary="List registered checkpoints, newest first")
def list_checkpoints(svc: ServicesDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                     after: Annotated[str | None, Query(max_length=64)] = None) -> CheckpointList:
    records = svc.store.list_checkpoints(tenant, limit, after)
    return CheckpointList(items=[_out(r, False) for r in records],
                          next=records[-1].id if len(records) == limit else None)


@router.get("/{checkpoint_id}", response_model=CheckpointOut, summary="Read a registered checkpoint",
            responses=responses(404))
def get_checkpoint(checkpoint_id: str, svc: ServicesDep, tenant: TenantDep) -> CheckpointOut:
    record = svc.store.get_checkpoint(checkpoint_id)
    if record is None or record.tenant != tenant:
        raise ApiProblem(404, "not_found", f"no checkpoint {checkpoint_id}")
    return _out(record, with_tensors=True)
