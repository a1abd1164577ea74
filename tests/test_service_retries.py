"""Transient storage errors are retried with backoff: a job whose S3 server is down waits and then succeeds."""

from __future__ import annotations

import time

from conftest import build_bert_family
from servers import SeaweedS3, Service, wait_for_job, wait_until

from app.core.redis_server import RedisServer


def test_job_survives_storage_outage(tmp_path):
    s3 = SeaweedS3(tmp_path / "s3").start()
    redis = RedisServer(tmp_path / "redis").start()
    family = build_bert_family(tmp_path / "family", n_tasks=2)
    uris = {"base": s3.upload_folder(family.base, "m/base")}
    uris |= {f"t{i}": s3.upload_folder(t, f"m/t{i}") for i, t in enumerate(family.tasks)}
    service = Service(tmp_path / "svc", redis, s3)
    try:
        service.start()
        s3.stop()
        spec = {"method": "task_arithmetic", "base_model": uris["base"],
                "models": [{"model": uris["t0"]}, {"model": uris["t1"]}]}
        with service.client() as client:
            job_id = client.post("/v1/merges", json=spec).json()["id"]
            retrying = wait_until(lambda: any(e["stage"] == "retrying" for e in client.get(
                f"/v1/merges/{job_id}/events").json()["items"]), 120, "a retry")
            assert retrying
            assert client.get(f"/v1/merges/{job_id}").json()["status"] in ("queued", "running")
            time.sleep(1)
            s3.start()  # same port and data: the next retry finds it
            done = wait_for_job(client, job_id, {"succeeded", "failed"}, timeout=240)
            assert done["status"] == "succeeded", (done["error"], service.logs())
            assert done["attempts"] >= 2 and done["error"] is None
    finally:
        service.stop()
        redis.stop()
        s3.stop()
