"""Service settings, from the environment (prefix MERGEFORGE_) or a .env file."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def hash_key(key: str) -> str:
    """API keys are configured and compared as sha256 hex digests, never stored in the clear."""
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGEFORGE_", env_file=".env", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = Field(default="file:///var/lib/mergeforge/data",
                             description="Where artifacts go when a job names no output: file://DIR or "
                                         "s3://BUCKET/PREFIX.")
    file_roots: list[Path] = Field(default_factory=list, description="Folders file:// checkpoints may be read "
                                   "from, besides the storage folder. Anything else is refused.")
    s3_buckets: list[str] = Field(default_factory=list, description="Buckets s3:// inputs and outputs may name, "
                                  "besides the storage bucket; empty: any the credentials reach.")
    s3_endpoint_url: str | None = Field(default=None, description="MinIO, SeaweedFS, or empty for AWS.")
    s3_region: str = "us-east-1"
    s3_presign_expiry_s: int = 3600
    s3_multipart_threshold: int = 64 * 1024 * 1024

    api_keys: dict[str, str] = Field(default_factory=dict, description="sha256(key) hex -> tenant name.")
    allow_anonymous: bool = Field(default=False, description="Accept requests without a key as tenant "
                                  "'default' (the embedded default on loopback only).")

    cache_dir: Path = Path.home() / ".cache" / "mergeforge" / "checkpoints"
    cache_max_bytes: int = 100 * 1024**3
    work_dir: Path = Path.home() / ".cache" / "mergeforge" / "work"

    device: str = Field(default="auto", description="Where workers compute: auto (CUDA when present), cpu, cuda.")
    queue_routes: dict[str, str] = Field(default_factory=lambda: {"adamerging": "gpu", "tinting": "gpu"},
                                         description="Method -> Celery queue; methods not listed go to 'cpu'.")
    job_soft_time_limit_s: int = 6 * 3600
    job_time_limit_s: int = 6 * 3600 + 300
    visibility_timeout_s: int = 7 * 3600
    lease_s: int = 60
    max_attempts: int = 3
    max_body_bytes: int = 1024 * 1024
    rate_limit_per_minute: int | None = Field(default=None, ge=1, description="Requests one tenant may make "
                                              "per minute across all API replicas; more get 429. Unset: no limit.")
    webhook_allow_private: bool = Field(default=False, description="Let webhooks call private, loopback "
                                        "and link-local addresses (the embedded service does).")
    max_active_jobs: int = Field(default=1000, ge=1, description="Jobs one tenant may have queued or running; "
                                 "more are refused with 429 until some end: one tenant cannot fill the queues.")
    event_ttl_s: int = 30 * 24 * 3600
    idempotency_ttl_s: int = 24 * 3600

    def queue_for(self, method: str) -> str:
        return self.queue_routes.get(method, "cpu")

    @property
    def queues(self) -> tuple[str, ...]:
        return tuple(sorted({"cpu", *self.queue_routes.values()}))


@cache
def get_settings() -> Settings:
    return Settings()
