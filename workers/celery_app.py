"""The Celery application: Redis broker, long tasks done right (acks late, prefetch 1, requeue on worker loss).

Torch-free: the API imports it to enqueue by task name."""

from __future__ import annotations

from celery import Celery

from app.core.config import get_settings

MERGE_TASK = "mergeforge.merge"
WEBHOOK_TASK = "mergeforge.webhook"


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("mergeforge", broker=settings.redis_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue="cpu",
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_time_limit_s,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        imports=("workers.tasks",),
    )
    return app


celery_app = make_celery()
