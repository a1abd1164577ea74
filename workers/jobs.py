"""Runs one merge job end to end: lease, fetch inputs into the cache, run the engine, upload artifacts under an
attempt-scoped prefix with the manifest last, and record the outcome. Celery only delivers the job id; a
redelivered or duplicate message finds the record and does nothing twice."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from app.core import webhooks
from app.core.config import Settings
from app.core.jobstore import TERMINAL, Artifact, JobError, JobRecord, JobStore, Status, is_checkpoint_id, now
from app.core.metrics import record_duration
from app.core.storage import StorageError, Storages, TransientStorageError, join
from workers.cache import CheckpointCache
from workers.engine.errors import EngineError, ErrorCode
from workers.engine.spec import MergeSpec

log = logging.getLogger(__name__)
MANIFEST = "merge_manifest.json"
STATE = "state/adaptive.safetensors"  # under the job's output: an adaptive method's resumable state
FETCH, MERGE = 0.1, 0.85  # shares of the progress bar: fetch, merge, then upload


class Cancelled(Exception):
    pass


class LeaseLost(Exception):
    """Another worker took the job over (this one was presumed dead): stop without writing anything."""


class JobRunner:
    def __init__(self, settings: Settings, store: JobStore, storages: Storages):
        self.settings, self.store, self.storages = settings, store, storages
        self.cache = CheckpointCache(settings.cache_dir, settings.cache_max_bytes)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------------------------------ lifecycle
    def run(self, job_id: str) -> None:
        """Raises TransientStorageError for the caller to retry with backoff; every other failure is recorded."""
        job = self.store.get(job_id)
        if job is None or job.status in TERMINAL:
            return
        if job.cancel_requested:
            self._finish(job, Status.CANCELLED, "cancelled")
            return
        if not self.store.acquire_lease(job_id, self.owner, self.settings.lease_s):
            log.info("job %s is leased by another worker; skipping this delivery", job_id)
            return
        workdir = self.settings.work_dir / job_id / self.owner.replace(":", "-")
        self._sources: dict[str, str] = {}  # local input folder -> the URI it was fetched from
        self.keeper = _LeaseKeeper(self.store, job_id, self.owner, self.settings.lease_s)
        self.keeper.start()
        try:
            started = self.store.update(job_id, allowed={Status.QUEUED, Status.RUNNING}, status=Status.RUNNING,
                                        stage="fetch", progress=0.0, attempts=job.attempts + 1,
                                        started_at=job.started_at or now(), error=None)
            if started is None:  # cancelled meanwhile
                job = self.store.get(job_id)
                if job is not None and job.status == Status.CANCELLING:
                    self._finish(job, Status.CANCELLED, "cancelled")
                return
            self._attempt(started, workdir)
        except Cancelled:
            self._finish(self.store.get(job_id) or job, Status.CANCELLED, "cancelled")
        except LeaseLost:
            log.warning("job %s was taken over by another worker; this attempt stops", job_id)
        except EngineError as exc:
            message, detail = self._public(exc.message), json.loads(self._public(json.dumps(exc.detail)))
            self.fail(job_id, exc.code.value, message, detail)
        except TransientStorageError:
            self.store.update(job_id, allowed={Status.RUNNING}, status=Status.QUEUED, stage="retrying")
            raise
        except Exception as exc:
            if type(exc).__name__ == "SoftTimeLimitExceeded":
                limit = self.settings.job_soft_time_limit_s
                self.fail(job_id, "timeout", f"the job ran past its time limit ({limit} s)")
            else:
                log.exception("job %s failed", job_id)
                self.fail(job_id, ErrorCode.INTERNAL.value, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.keeper.stop.set()
            self.keeper.join()
            self.store.release_lease(job_id, self.owner)
            shutil.rmtree(workdir, ignore_errors=True)

    def _attempt(self, job: JobRecord, workdir: Path) -> None:
        from workers.engine.merge import Progress, run_merge

        prefix = join(job.output, f"attempt-{job.attempts}")
        storage = self.storages.for_uri(job.output)
        for older in range(1, job.attempts):  # a lost attempt may have left a partial upload
            storage.delete_prefix(join(job.output, f"attempt-{older}"))
        spec = MergeSpec.model_validate(job.spec)
        refs = [spec.base_model, *(m.model for m in spec.models)]
        known: dict[Path, str] = {}
        local = [self._fetch(job, ref, workdir / "inputs" / str(i), i / len(refs), known)
                 for i, ref in enumerate(refs)]
        data = [self._fetch_data(job, m.data, workdir / "data" / str(i)) if m.data else None
                for i, m in enumerate(spec.models)]
        local_spec = spec.model_copy(update={
            "base_model": str(local[0]),
            "models": [m.model_copy(update={"model": str(p), "name": m.task_name(), "data": d and str(d)})
                       for m, p, d in zip(spec.models, local[1:], data, strict=True)]})
        beat = _Beat(self, job.id)

        def on_progress(p: Progress) -> None:
            beat(p.stage, FETCH + MERGE * p.fraction, p.message, p.metrics)

        out = workdir / "out"
        self._event(job.id, "merge", FETCH, f"merging with {spec.method}")
        run_merge(local_spec, out, on_progress, known_sha256=known, device=self.settings.device,
                  resume=self._resume(job, storage, workdir) if spec.method_cls.uses_data else None)
        self._upload(job, out, prefix, storage, beat)
        _delete_state(storage, job)

    def _fetch(self, job: JobRecord, ref: str, dest: Path, share: float, known: dict[Path, str]) -> Path:
        uri = ref
        if is_checkpoint_id(ref):
            record = self.store.get_checkpoint(ref)
            if record is None or record.tenant != job.tenant:
                raise EngineError(ErrorCode.INPUT_NOT_FOUND, f"no registered checkpoint {ref}", {"checkpoint": ref})
            uri = record.uri
        self._check_cancel(job.id)
        self._event(job.id, "fetch", FETCH * share, f"fetching {uri}")
        self._sources[str(dest)] = uri
        try:
            path, digests = self.cache.materialize(self.storages.for_uri(uri), uri, dest)
        except StorageError as exc:  # missing, denied, malformed: retrying will not help
            raise EngineError(ErrorCode.INPUT_NOT_FOUND, f"cannot read {uri}: {exc}", {"uri": uri}) from None
        known.update({dest / name: digest for name, digest in digests.items()})
        return path

    def _fetch_data(self, job: JobRecord, uri: str, dest: Path) -> Path:
        """One task's unlabeled inputs (a single file), through the cache like checkpoints."""
        self._check_cancel(job.id)
        self._sources[str(dest)] = uri
        storage = self.storages.for_uri(uri)
        try:
            info = next((o for o in storage.list(uri) if o.uri == uri), None)
            if info is None:
                raise EngineError(ErrorCode.INPUT_NOT_FOUND, f"{uri}: no such file (data is one JSONL or "
                                  ".safetensors file)", {"uri": uri})
            cached, _ = self.cache.object_for(storage, info)
        except StorageError as exc:
            raise EngineError(ErrorCode.INPUT_NOT_FOUND, f"cannot read {uri}: {exc}", {"uri": uri}) from None
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / uri.rsplit("/", 1)[-1]
        os.link(cached, path)
        return path

    def _resume(self, job: JobRecord, storage: Any, workdir: Path) -> Any:
        """The adaptive state a previous attempt saved, fetched for the engine to resume from; every save is
        uploaded back, so a redelivered job resumes on any worker."""
        from workers.engine.merge import Resume

        local = workdir / "state.safetensors"
        uri = join(job.output, STATE)
        try:
            storage.download(uri, local)
            self._event(job.id, "adapt", FETCH, "found the state a previous attempt saved")
        except StorageError:  # none saved yet
            local.unlink(missing_ok=True)

        def saved(path: Path) -> None:
            self._hold_lease(job.id)
            storage.upload(path, uri)

        return Resume(local, saved)

    def _upload(self, job: JobRecord, out: Path, prefix: str, storage: Any, beat: _Beat) -> None:
        manifest = json.loads((out / MANIFEST).read_text())
        files = manifest["outputs"]
        total = sum(f["size"] for f in files) or 1
        done = 0
        artifacts = []
        for f in files:  # every file first, the manifest last: a prefix without it is not a finished merge
            self._hold_lease(job.id)
            uri = join(prefix, f["path"])
            storage.upload(out / f["path"], uri)
            artifacts.append(Artifact(path=f["path"], uri=uri, size=f["size"], sha256=f["sha256"]))
            done += f["size"]
            beat("upload", FETCH + MERGE + (1 - FETCH - MERGE) * done / total, f"uploaded {f['path']}")
        manifest_path = out / MANIFEST
        self._hold_lease(job.id)
        storage.upload(manifest_path, join(prefix, MANIFEST))
        digest = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
        artifacts.append(Artifact(path=MANIFEST, uri=join(prefix, MANIFEST), size=manifest_path.stat().st_size,
                                  sha256=digest))
        finished = self.store.update(job.id, allowed={Status.RUNNING, Status.CANCELLING}, status=Status.SUCCEEDED,
                                     stage="succeeded", progress=1.0, finished_at=now(), artifacts=artifacts,
                                     artifacts_prefix=prefix)
        if finished is None:  # cancelled or taken over meanwhile: this attempt's files are not the job's
            storage.delete_prefix(prefix)
            raise LeaseLost()
        self._ended(finished)

    # ------------------------------------------------------------------------------------------- helpers
    def _event(self, job_id: str, stage: str, fraction: float, message: str,
               metrics: dict[str, Any] | None = None) -> None:
        try:
            self.store.update(job_id, allowed={Status.RUNNING, Status.CANCELLING}, stage=stage, progress=fraction)
            self.store.add_event(job_id, stage, fraction, message, metrics=metrics)
        except Exception:  # Redis restarting: progress is best effort, the merge goes on
            log.warning("could not record progress of %s", job_id, exc_info=True)

    def _public(self, text: str) -> str:
        """Engine messages name local files; say which input they came from instead of the worker's copy."""
        for local, uri in sorted(self._sources.items(), key=lambda kv: -len(kv[0])):
            if uri.endswith(".safetensors"):  # a single-file checkpoint sits in its folder under its own name
                text = text.replace(f"{local}/{uri.rsplit('/', 1)[-1]}", uri)
            text = text.replace(local, uri.rstrip("/"))
        return text

    def _hold_lease(self, job_id: str) -> None:
        if self.keeper.lost.is_set() or not self.store.refresh_lease(job_id, self.owner, self.settings.lease_s):
            raise LeaseLost()

    def _check_cancel(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.cancel_requested:
            raise Cancelled()

    def fail(self, job_id: str, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        job = self.store.update(job_id, allowed={Status.QUEUED, Status.RUNNING, Status.CANCELLING},
                                status=Status.FAILED, stage="failed", finished_at=now(),
                                error=JobError(code=code, message=message, detail=detail or {}))
        if job is not None:
            try:
                _delete_state(self.storages.for_uri(job.output), job)
            except Exception:  # the failure is recorded; a stale state is only ignored by a later job
                log.warning("could not delete the saved state of %s", job_id, exc_info=True)
            self._ended(job)

    def _finish(self, job: JobRecord, status: Status, stage: str) -> None:
        storage = self.storages.for_uri(job.output)
        for attempt in range(1, job.attempts + 1):
            storage.delete_prefix(join(job.output, f"attempt-{attempt}"))
        _delete_state(storage, job)
        ended = self.store.update(job.id, allowed={Status.QUEUED, Status.RUNNING, Status.CANCELLING}, status=status,
                                  stage=stage, finished_at=now())
        if ended is not None:
            self._ended(ended)

    def _ended(self, job: JobRecord) -> None:
        if job.started_at and job.finished_at:
            record_duration(self.store, job.status.value, (job.finished_at - job.started_at).total_seconds())
        if job.webhook_url:
            deliver_webhook(self.store, job, self.settings.webhook_allow_private)


def _delete_state(storage: Any, job: JobRecord) -> None:
    storage.delete_prefix(join(job.output, STATE.split("/")[0]))


class _Beat:
    """Throttled progress: the record at most twice a second, an event a second or on a stage change; the lease
    is refreshed and cancellation checked on the way (raising Cancelled stops the engine between tensors)."""

    def __init__(self, runner: JobRunner, job_id: str):
        self.runner, self.job_id = runner, job_id
        self.last_event = self.last_check = 0.0
        self.stage = ""

    def __call__(self, stage: str, fraction: float, message: str, metrics: dict[str, Any] | None = None) -> None:
        t = time.monotonic()
        last_step = bool(metrics) and metrics.get("step") == metrics.get("steps")
        if stage != self.stage or t - self.last_event >= 1.0 or last_step:
            self.stage, self.last_event = stage, t
            self.runner._event(self.job_id, stage, fraction, message, metrics)
        if self.runner.keeper.lost.is_set():
            raise LeaseLost()
        if t - self.last_check >= 0.5:
            self.last_check = t
            try:
                job = self.runner.store.get(self.job_id)
            except Exception:
                log.warning("could not reach the job store for %s", self.job_id, exc_info=True)
                return
            if job is None or job.cancel_requested:
                raise Cancelled()


class _LeaseKeeper(threading.Thread):
    """Refreshes the job's lease every third of its length while the job runs, whatever stage it is in (a long
    download reports no progress); if another worker took the lease, says so through `lost`."""

    def __init__(self, store: JobStore, job_id: str, owner: str, lease_s: int):
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.store, self.job_id, self.owner, self.lease_s = store, job_id, owner, lease_s
        self.stop, self.lost = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.lease_s / 3):
            try:
                if not self.store.refresh_lease(self.job_id, self.owner, self.lease_s):
                    self.lost.set()
                    return
            except Exception:  # Redis restarting: try again at the next beat
                log.warning("could not refresh the lease of %s", self.job_id, exc_info=True)


def webhook_headers(job: JobRecord, body: bytes) -> dict[str, str]:
    """The delivery id is the same on every retry, so a receiver can drop repeats; the signature covers the
    timestamp too, so a receiver can refuse a delivery replayed later."""
    headers = {"Content-Type": "application/json", "User-Agent": "mergeforge-webhook",
               "X-MergeForge-Delivery": f"{job.id}.{job.status.value}"}
    if job.webhook_secret:
        timestamp = str(int(time.time()))
        digest = hmac.new(job.webhook_secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        headers |= {"X-MergeForge-Timestamp": timestamp, "X-MergeForge-Signature": f"sha256={digest}"}
    return headers


def deliver_webhook(store: JobStore, job: JobRecord, allow_private: bool, attempts: int = 3) -> None:
    """POST the ended job to its webhook, with retries; the outcome is a job event, never a job failure."""
    body = json.dumps({"event": f"merge.{job.status.value}", "job": json.loads(job.model_dump_json(
        exclude={"tenant", "webhook_secret"}))}).encode()
    assert job.webhook_url is not None
    for attempt in range(attempts):
        try:
            status = webhooks.post(job.webhook_url, body, webhook_headers(job, body), allow_private)
            if status < 300:
                store.add_event(job.id, "webhook", 1.0, f"webhook answered {status}")
                return
            problem = f"HTTP {status}"
        except webhooks.WebhookRefused as exc:
            store.add_event(job.id, "webhook", 1.0, f"webhook refused: {exc}")
            return
        except Exception as exc:
            problem = str(exc) or type(exc).__name__
        if attempt == attempts - 1:
            store.add_event(job.id, "webhook", 1.0, f"webhook failed: {problem}")
            return
        time.sleep(2 ** attempt)
