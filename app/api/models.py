"""Request and response bodies of the public API (the OpenAPI contract in openapi/openapi.json)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AnyHttpUrl, BaseModel, Field, SecretStr, field_validator

from app.core.jobstore import Artifact, Event, JobError, Status
from workers.engine.spec import MergeSpec


class MergeRequest(MergeSpec):
    """A merge job: the engine's SPEC, with checkpoints as s3:// or file:// URIs or registered checkpoint ids."""

    output: str | None = Field(default=None, description="URI prefix for the artifacts (s3://BUCKET/PREFIX); "
                               "default: the service's storage. The job's artifacts go under OUTPUT/JOB_ID/.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Up to 32 small string pairs, returned "
                                     "as given.")
    webhook_url: AnyHttpUrl | None = Field(default=None, description="POSTed the job when it ends.")
    webhook_secret: SecretStr | None = Field(
        default=None, min_length=16, max_length=256, description="Signs each webhook delivery: "
        "`X-MergeForge-Signature: sha256=HEX`, the HMAC-SHA256 with this secret of `TIMESTAMP.BODY`, TIMESTAMP being "
        "the `X-MergeForge-Timestamp` header (Unix seconds). Never returned.")

    @field_validator("metadata")
    @classmethod
    def _small(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 32 or any(len(k) > 64 or len(val) > 512 for k, val in v.items()):
            raise ValueError("metadata holds at most 32 pairs, keys up to 64 and values up to 512 characters")
        return v


class JobOut(BaseModel):
    id: str
    status: Status
    stage: str
    progress: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]
    output: str
    queue: str
    error: JobError | None
    artifacts: list[Artifact]
    metadata: dict[str, str]
    attempts: int


class JobList(BaseModel):
    items: list[JobOut]
    next: str | None = Field(description="Pass as `after` for the next page; null on the last page.")


class EventList(BaseModel):
    items: list[Event]
    next: str | None


class ArtifactFile(BaseModel):
    path: str
    size: int
    sha256: str
    uri: str
    url: str = Field(description="Presigned for S3; served by this API for file storage.")


class ArtifactsOut(BaseModel):
    job_id: str
    prefix: str
    manifest: dict[str, Any]
    files: list[ArtifactFile]


class CheckpointIn(BaseModel):
    uri: str = Field(description="s3:// or file:// URI of a Hugging Face model folder or a .safetensors file.")


class CheckpointOut(BaseModel):
    id: str
    uri: str
    created_at: datetime
    size: int
    files: list[dict[str, Any]]
    tensor_count: int
    tensors: dict[str, dict[str, Any]] | None = Field(default=None, description="name -> dtype and shape; "
                                                      "only on GET of one checkpoint.")


class CheckpointList(BaseModel):
    items: list[CheckpointOut]
    next: str | None


class MethodOut(BaseModel):
    name: str
    summary: str
    description: str
    models: dict[str, int | None]
    uses_data: bool = Field(description="Adaptive: learns from each model's unlabeled `data`.")
    parameters: dict[str, Any]


class Health(BaseModel):
    status: str
    checks: dict[str, bool] = Field(default_factory=dict)
