"""The job record store: Redis, separate from Celery's broker keys. It is the source of truth for a job's status,
progress, events and artifacts; Celery's result backend is not used.

Keys (prefix `mf:`): `job:{id}` JSON record; `jobs:{tenant}` sorted set of ids (ids sort by creation time);
`events:{id}` a stream (its entry ids are the event cursors and SSE ids); `idem:{tenant}:{key}` idempotency;
`lease:{id}` the running worker's lease; `running` sorted set of lease deadlines, for the reaper;
`active:{tenant}` the ids of the tenant's jobs that have not ended; `ckpt:{id}` and `ckpts:{tenant}` registered
checkpoints; `worker:{name}` heartbeats and `workers` their expiry times; `rate:{tenant}:{minute}` request
counts; `stats:status` counts.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from contextlib import suppress
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field
from redis import Redis, WatchError

_B32 = "0123456789abcdefghjkmnpqrstvwxyz"


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL = {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED}
CHECKPOINT_ID = "ckpt"  # registered checkpoints are named ckpt_...; a job may give one instead of a URI


def is_checkpoint_id(ref: str) -> bool:
    return ref.startswith(f"{CHECKPOINT_ID}_")


def new_id(prefix: str) -> str:
    """Time-sortable ids (48-bit ms clock + 40 random bits, Crockford base32): listing order is creation order."""
    value = (int(time.time() * 1000) << 40) | secrets.randbits(40)
    chars = []
    for _ in range(18):
        chars.append(_B32[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


def now() -> datetime:
    return datetime.now(UTC)


class JobError(BaseModel):
    code: str
    message: str
    detail: dict[str, Any] = Field(default_factory=dict)


class Artifact(BaseModel):
    path: str
    uri: str
    size: int
    sha256: str


class JobRecord(BaseModel):
    id: str
    tenant: str
    status: Status = Status.QUEUED
    stage: str = "queued"
    progress: float = 0.0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    spec: dict[str, Any]
    queue: str
    output: str  # the URI prefix this job's artifacts go under: {output}/attempt-{n}/
    metadata: dict[str, str] = Field(default_factory=dict)
    webhook_url: str | None = None
    webhook_secret: str | None = None  # signs the webhook; never returned by the API
    error: JobError | None = None
    artifacts: list[Artifact] = Field(default_factory=list)
    artifacts_prefix: str | None = None
    attempts: int = 0
    cancel_requested: bool = False


class Event(BaseModel):
    id: str
    time: datetime
    stage: str
    fraction: float
    message: str = ""
    status: Status | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class CheckpointRecord(BaseModel):
    id: str
    tenant: str
    uri: str
    created_at: datetime
    files: list[dict[str, Any]]
    tensors: dict[str, dict[str, Any]]  # name -> {dtype, shape}
    size: int
    config: dict[str, Any] | None = None


def event_from(entry_id: str, fields: dict[str, str]) -> Event:
    """An event from its stream entry (`mf:events:{id}`)."""
    return Event(id=entry_id, time=fields["time"], stage=fields["stage"], fraction=float(fields["fraction"]),
                 message=fields.get("message", ""), status=fields.get("status") or None,
                 metrics=json.loads(fields.get("metrics") or "{}"))


class IdempotencyConflict(Exception):
    """The key was used before with a different body."""


class TooManyActiveJobs(Exception):
    """The tenant already has its limit of queued and running jobs."""


class JobStore:
    def __init__(self, redis: Redis, event_ttl_s: int = 30 * 24 * 3600, idempotency_ttl_s: int = 24 * 3600):
        self.r = redis
        self.event_ttl_s = event_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> JobStore:
        redis = Redis.from_url(url, decode_responses=True, health_check_interval=10,
                               socket_connect_timeout=5, socket_timeout=30, retry_on_timeout=True)
        return cls(redis, **kwargs)

    # ----------------------------------------------------------------------------------------------- jobs
    def create(self, record: JobRecord, idempotency_key: str | None = None, body_hash: str | None = None,
               max_active: int | None = None) -> tuple[JobRecord, bool]:
        """Store a new job, or return the one an idempotency key already names (created=False). The key's claim
        and the job are written in one transaction, so two racing requests cannot both create a job, nor both take
        the tenant's last free slot under `max_active`."""
        idem = f"mf:idem:{record.tenant}:{idempotency_key}" if idempotency_key else None
        active = f"mf:active:{record.tenant}"
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(active)
                    if idem:
                        pipe.watch(idem)
                        raw = pipe.get(idem)
                        if raw:
                            existing = json.loads(raw)
                            if existing.get("hash") != body_hash:
                                raise IdempotencyConflict(idempotency_key)
                            job = self.get(existing["job"])
                            if job is not None:
                                return job, False
                    if max_active is not None and pipe.scard(active) >= max_active:
                        raise TooManyActiveJobs(max_active)
                    pipe.multi()
                    pipe.sadd(active, record.id)
                    if idem:
                        pipe.set(idem, json.dumps({"hash": body_hash, "job": record.id}), ex=self.idempotency_ttl_s)
                    pipe.set(f"mf:job:{record.id}", record.model_dump_json())
                    pipe.zadd(f"mf:jobs:{record.tenant}", {record.id: 0})
                    pipe.hincrby("mf:stats:status", record.status.value, 1)
                    self._queue_event(pipe, record.id, "queued", 0.0, "job accepted", Status.QUEUED)
                    pipe.execute()
                    return record, True
                except WatchError:
                    continue

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.r.get(f"mf:job:{job_id}")
        return JobRecord.model_validate_json(raw) if raw else None

    def list(self, tenant: str, status: Status | None, limit: int, after: str | None) -> list[JobRecord]:
        """Newest first; `after` is the id of the last job of the previous page."""
        out: list[JobRecord] = []
        upper = f"({after}" if after else "+"
        while len(out) < limit:
            ids = self.r.zrevrangebylex(f"mf:jobs:{tenant}", upper, "-", start=0, num=max(limit, 50))
            if not ids:
                break
            raws = self.r.mget([f"mf:job:{i}" for i in ids])
            for raw in raws:
                if raw:
                    job = JobRecord.model_validate_json(raw)
                    if status is None or job.status == status:
                        out.append(job)
                        if len(out) == limit:
                            break
            upper = f"({ids[-1]}"
        return out

    def update(self, job_id: str, *, allowed: set[Status] | None = None, **fields: Any) -> JobRecord | None:
        """Apply `fields` atomically, only if the job exists and (when given) its status is in `allowed`."""
        key = f"mf:job:{job_id}"
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if not raw:
                        return None
                    job = JobRecord.model_validate_json(raw)
                    if allowed is not None and job.status not in allowed:
                        return None
                    updated = job.model_copy(update=fields)
                    pipe.multi()
                    pipe.set(key, updated.model_dump_json())
                    if updated.status != job.status:  # the record and its status event change together
                        pipe.hincrby("mf:stats:status", job.status.value, -1)
                        pipe.hincrby("mf:stats:status", updated.status.value, 1)
                        if updated.status in TERMINAL:
                            pipe.srem(f"mf:active:{job.tenant}", job_id)
                        self._queue_event(pipe, job_id, updated.stage, updated.progress,
                                          f"status {updated.status.value}", updated.status)
                    pipe.execute()
                    return updated
                except WatchError:
                    continue

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """queued -> cancelled now; running -> cancelling (the worker stops at its next tensor or step)."""
        job = self.update(job_id, allowed={Status.QUEUED}, status=Status.CANCELLED, stage="cancelled",
                          finished_at=now(), cancel_requested=True)
        if job is None:
            job = self.update(job_id, allowed={Status.RUNNING}, status=Status.CANCELLING, cancel_requested=True)
        return job

    def delete(self, job: JobRecord) -> None:
        with self.r.pipeline() as pipe:
            pipe.delete(f"mf:job:{job.id}", f"mf:events:{job.id}", f"mf:lease:{job.id}")
            pipe.zrem(f"mf:jobs:{job.tenant}", job.id)
            pipe.srem(f"mf:active:{job.tenant}", job.id)
            pipe.zrem("mf:running", job.id)
            pipe.hincrby("mf:stats:status", job.status.value, -1)
            pipe.execute()

    def status_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall("mf:stats:status").items()}

    # --------------------------------------------------------------------------------------------- events
    def add_event(self, job_id: str, stage: str, fraction: float, message: str = "",
                  status: Status | None = None, metrics: dict[str, Any] | None = None) -> str:
        with self.r.pipeline() as pipe:
            self._queue_event(pipe, job_id, stage, fraction, message, status, metrics)
            event_id, _ = pipe.execute()
        return event_id

    def _queue_event(self, pipe: Any, job_id: str, stage: str, fraction: float, message: str,
                     status: Status | None = None, metrics: dict[str, Any] | None = None) -> None:
        fields = {"time": now().isoformat(), "stage": stage, "fraction": f"{fraction:.6f}", "message": message,
                  "status": status.value if status else "", "metrics": json.dumps(metrics or {})}
        pipe.xadd(f"mf:events:{job_id}", fields)
        pipe.expire(f"mf:events:{job_id}", self.event_ttl_s)

    def events(self, job_id: str, after: str | None, limit: int) -> list[Event]:
        start = f"({after}" if after else "-"
        return [event_from(i, f) for i, f in self.r.xrange(f"mf:events:{job_id}", start, "+", count=limit)]

    # --------------------------------------------------------------------------------------------- leases
    def acquire_lease(self, job_id: str, owner: str, ttl_s: int) -> bool:
        """One worker at a time runs a job; a lease left by a dead worker expires and can be taken."""
        key = f"mf:lease:{job_id}"
        if self.r.set(key, owner, nx=True, ex=ttl_s) or self.r.get(key) == owner:
            self.r.expire(key, ttl_s)
            self.r.zadd("mf:running", {job_id: time.time() + ttl_s})
            return True
        return False

    def refresh_lease(self, job_id: str, owner: str, ttl_s: int) -> bool:
        key = f"mf:lease:{job_id}"
        if self.r.get(key) != owner:
            return False
        self.r.expire(key, ttl_s)
        self.r.zadd("mf:running", {job_id: time.time() + ttl_s})
        return True

    def release_lease(self, job_id: str, owner: str) -> None:
        key = f"mf:lease:{job_id}"
        if self.r.get(key) == owner:
            self.r.delete(key)
        self.r.zrem("mf:running", job_id)

    def expired_leases(self) -> list[str]:
        return list(self.r.zrangebyscore("mf:running", "-inf", time.time()))

    def claim_requeue(self, job_id: str) -> bool:
        """Exactly one reaper requeues a job whose lease expired."""
        return bool(self.r.zrem("mf:running", job_id)) and not self.r.exists(f"mf:lease:{job_id}")

    # ---------------------------------------------------------------------------------------- checkpoints
    def put_checkpoint(self, record: CheckpointRecord) -> None:
        with self.r.pipeline() as pipe:
            pipe.set(f"mf:ckpt:{record.id}", record.model_dump_json())
            pipe.zadd(f"mf:ckpts:{record.tenant}", {record.id: 0})
            pipe.execute()

    def get_checkpoint(self, checkpoint_id: str) -> CheckpointRecord | None:
        raw = self.r.get(f"mf:ckpt:{checkpoint_id}")
        return CheckpointRecord.model_validate_json(raw) if raw else None

    def list_checkpoints(self, tenant: str, limit: int, after: str | None) -> list[CheckpointRecord]:
        upper = f"({after}" if after else "+"
        ids = self.r.zrevrangebylex(f"mf:ckpts:{tenant}", upper, "-", start=0, num=limit)
        raws = self.r.mget([f"mf:ckpt:{i}" for i in ids]) if ids else []
        return [CheckpointRecord.model_validate_json(r) for r in raws if r]

    # -------------------------------------------------------------------------------------------- workers
    def heartbeat(self, name: str, info: dict[str, Any], ttl_s: int = 30) -> None:
        seen = time.time()
        with self.r.pipeline() as pipe:
            pipe.set(f"mf:worker:{name}", json.dumps({**info, "pid": os.getpid(), "seen": seen}), ex=ttl_s)
            pipe.zadd("mf:workers", {name: seen + ttl_s})
            pipe.execute()

    def live_workers(self) -> list[dict[str, Any]]:
        """Read from the `workers` index, not a keyspace scan: readiness probes call this every few seconds and
        the keyspace holds every job."""
        with self.r.pipeline() as pipe:
            pipe.zremrangebyscore("mf:workers", "-inf", time.time())
            pipe.zrange("mf:workers", 0, -1)
            names = pipe.execute()[1]
        raws = self.r.mget([f"mf:worker:{n}" for n in names]) if names else []
        return [json.loads(v) for v in raws if v]

    def queue_workers(self, queues: tuple[str, ...]) -> dict[str, int]:
        """Live workers consuming each queue: a queue with jobs and none of these never drains."""
        consumers = [set(w.get("queues", [])) for w in self.live_workers()]
        return {q: sum(q in c for c in consumers) for q in queues}

    def count_request(self, tenant: str) -> tuple[int, int]:
        """Count a request in the tenant's current minute (shared by every API replica): the count so far and the
        seconds until the next minute starts."""
        now_s = time.time()
        minute = int(now_s // 60)
        key = f"mf:rate:{tenant}:{minute}"
        with self.r.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count = pipe.execute()[0]
        return int(count), max(1, math.ceil((minute + 1) * 60 - now_s))

    def ping(self) -> bool:
        with suppress(Exception):
            return bool(self.r.ping())
        return False
