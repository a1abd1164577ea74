"""Celery tasks and worker lifecycle: the merge task, a heartbeat, and the reaper that requeues jobs whose
worker died (their lease expired) without waiting for the broker's visibility timeout."""

from __future__ import annotations

import logging
import socket
import threading
from functools import cache

from celery import Task
from celery.signals import worker_ready, worker_shutdown

from app.core.config import get_settings
from app.core.jobstore import JobError, JobStore, Status, now
from app.core.storage import Storages, TransientStorageError
from workers.celery_app import MERGE_TASK, WEBHOOK_TASK, celery_app
from workers.jobs import JobRunner, deliver_webhook

log = logging.getLogger(__name__)


@cache
def runner() -> JobRunner:
    settings = get_settings()
    store = JobStore.from_url(settings.redis_url, event_ttl_s=settings.event_ttl_s)
    return JobRunner(settings, store, Storages(settings))


@celery_app.task(name=MERGE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=5)
def merge_task(self: Task, job_id: str) -> None:
    try:
        runner().run(job_id)
    except TransientStorageError as exc:
        if self.request.retries >= self.max_retries:
            runner().fail(job_id, "storage_unavailable", f"storage stayed unavailable after {self.max_retries} "
                          f"retries: {exc}")
            return
        raise self.retry(exc=exc, countdown=min(300, 5 * 2 ** self.request.retries)) from None


@celery_app.task(name=WEBHOOK_TASK, ignore_result=True)
def webhook_task(job_id: str) -> None:
    """Webhooks of jobs that ended without a worker (cancelled while queued)."""
    job = runner().store.get(job_id)
    if job is not None and job.webhook_url:
        deliver_webhook(runner().store, job, runner().settings.webhook_allow_private)


def reap_once(store: JobStore, max_attempts: int) -> list[str]:
    """Requeue (or fail, past max_attempts) each running job whose lease expired; one reaper wins each job."""
    requeued = []
    for job_id in store.expired_leases():
        if not store.claim_requeue(job_id):
            continue
        job = store.get(job_id)
        if job is None or job.status not in (Status.RUNNING, Status.CANCELLING):
            continue
        if job.status == Status.CANCELLING:
            store.update(job_id, allowed={Status.CANCELLING}, status=Status.CANCELLED, stage="cancelled",
                         finished_at=now())
        elif job.attempts >= max_attempts:
            store.update(job_id, allowed={Status.RUNNING}, status=Status.FAILED, stage="failed", finished_at=now(),
                         error=JobError(code="worker_lost", message=f"the worker running this job was lost "
                                        f"{job.attempts} times", detail={"attempts": job.attempts}))
        elif store.update(job_id, allowed={Status.RUNNING}, status=Status.QUEUED, stage="requeued"):
            store.add_event(job_id, "requeued", job.progress, "the worker was lost; the job was requeued")
            celery_app.send_task(MERGE_TASK, args=[job_id], queue=job.queue)
            requeued.append(job_id)
    return requeued


class _Housekeeper(threading.Thread):
    def __init__(self, queues: list[str]):
        super().__init__(name="mergeforge-housekeeper", daemon=True)
        self.queues = queues
        self.stop = threading.Event()

    def run(self) -> None:
        settings = get_settings()
        store = runner().store
        name = f"{socket.gethostname()}:{self.native_id}"
        period = max(1.0, min(10.0, settings.lease_s / 3))
        while True:
            try:
                store.heartbeat(name, {"queues": self.queues}, ttl_s=int(period * 3) + 1)
                reap_once(store, settings.max_attempts)
            except Exception:
                log.warning("housekeeping failed; retrying", exc_info=True)
            if self.stop.wait(period):
                return


_housekeeper: _Housekeeper | None = None


@worker_ready.connect
def _start_housekeeping(sender=None, **_: object) -> None:
    global _housekeeper
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values()) if sender else []
    _housekeeper = _Housekeeper(queues)
    _housekeeper.start()


@worker_shutdown.connect
def _stop_housekeeping(**_: object) -> None:
    if _housekeeper is not None:
        _housekeeper.stop.set()
