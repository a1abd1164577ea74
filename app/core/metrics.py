"""Prometheus metrics: HTTP requests from this process; jobs by status, queue depth and job durations read from
Redis at scrape time, so every API replica reports the same service-wide numbers."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from app.core.jobstore import JobStore, Status

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


def record_duration(store: JobStore, status: str, seconds: float) -> None:
    """Called by workers when a job ends: cumulative histogram buckets in one Redis hash."""
    with store.r.pipeline() as pipe:
        key = f"mf:stats:duration:{status}"
        for bound in DURATION_BUCKETS:
            if seconds <= bound:
                pipe.hincrby(key, str(bound), 1)
        pipe.hincrby(key, "+Inf", 1)
        pipe.hincrbyfloat(key, "sum", seconds)
        pipe.execute()


class ServiceCollector(Collector):
    def __init__(self, store: JobStore, queues: tuple[str, ...]):
        self.store, self.queues = store, queues

    def collect(self) -> Iterator:
        jobs = GaugeMetricFamily("mergeforge_jobs", "Jobs by status", labels=["status"])
        counts = self.store.status_counts()
        for status in Status:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        depth = GaugeMetricFamily("mergeforge_queue_depth", "Messages waiting in each Celery queue",
                                  labels=["queue"])
        for queue in self.queues:
            depth.add_metric([queue], self.store.r.llen(queue))
        yield depth
        workers = GaugeMetricFamily("mergeforge_queue_workers", "Live workers consuming each Celery queue",
                                    labels=["queue"])
        for queue, n in self.store.queue_workers(self.queues).items():
            workers.add_metric([queue], n)
        yield workers
        durations = HistogramMetricFamily("mergeforge_job_duration_seconds", "Wall time of ended jobs",
                                          labels=["status"])
        for status in ("succeeded", "failed", "cancelled"):
            raw = self.store.r.hgetall(f"mf:stats:duration:{status}")
            if raw:
                buckets = [(str(float(b)), int(raw.get(str(b), 0))) for b in DURATION_BUCKETS]
                buckets.append(("+Inf", int(raw.get("+Inf", 0))))
                durations.add_metric([status], buckets, float(raw.get("sum", 0.0)))
        yield durations


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mergeforge_http_requests_total", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("mergeforge_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry)
        self._service: ServiceCollector | None = None

    def attach(self, store: JobStore, queues: tuple[str, ...]) -> None:
        if self._service is None:
            self._service = ServiceCollector(store, queues)
            self.registry.register(self._service)
