"""The merge methods and their parameter JSON schemas, from the engine's registry (no torch imported)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import TenantDep
from app.api.models import MethodOut
from app.api.problems import responses
from workers.engine.methods import all_methods

router = APIRouter(prefix="/v1/methods", tags=["methods"], responses=responses(401, 429))


@router.get("", response_model=list[MethodOut], summary="List merge methods")
def list_methods(_: TenantDep) -> list[MethodOut]:
    return [MethodOut.model_validate(m.describe()) for m in all_methods().values()]
