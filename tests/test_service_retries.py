"""Transient storage errors are retried with backoff: a job whose S3 server is down waits and then succeeds."""

from __future__ import annotations

import time

from conftest import build_bert_family
from servers import SeaweedS3, Service, running_service, wait_for_job, wait_until


def test_job_survives_storage_outage(tmp_path):
    s3 = SeaweedS3(tmp_path / "s3").start()
    family = build_bert_family(tmp_path / "family", n_tasks=2)
    uris = {"base": s3.upload_folder(family.base, "m/base")}
    uris |= {f"t{i}": s3.upload_folder(t, f"m/t{i}") for i, t in enumerate(family.tasks)}
    try:
        with running_service(tmp_path / "svc", s3) as service:
            _outage(service, s3, uris)
    finally:
        s3.stop()


def _outage(service: Service, s3: SeaweedS3, uris: dict[str, str]) -> None:
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
