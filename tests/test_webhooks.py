"""Webhooks: a job that names `webhook_url` is POSTed to it when it ends."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from servers import running_service, wait_for_job, wait_until


def _receiver():
    received: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.put((self.headers, body))  # a Message: names are case-insensitive
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def test_webhook_receives_the_ended_job_signed(service, stored_family):
    secret = "whsec-0123456789abcdef"
    server, received = _receiver()
    try:
        spec = {"method": "task_arithmetic", "base_model": stored_family["base"],
                "models": [{"model": stored_family["task0"]}, {"model": stored_family["task1"]}],
                "webhook_url": f"http://127.0.0.1:{server.server_address[1]}/hooks/merge", "webhook_secret": secret}
        with service.client() as client:
            job_id = client.post("/v1/merges", json=spec).json()["id"]
            done = wait_for_job(client, job_id, {"succeeded", "failed"})
            assert done["status"] == "succeeded", done["error"]
            headers, raw = received.get(timeout=60)
            body = json.loads(raw)
            assert headers["Content-Type"] == "application/json"
            assert body["event"] == "merge.succeeded" and body["job"]["id"] == job_id
            assert body["job"]["status"] == "succeeded" and body["job"]["artifacts"]
            assert "tenant" not in body["job"] and secret not in raw.decode()
            # The receiver's check: HMAC-SHA256 of "TIMESTAMP.BODY" with the job's secret, timestamp recent.
            timestamp = headers["X-MergeForge-Timestamp"]
            expected = hmac.new(secret.encode(), timestamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["X-MergeForge-Signature"], f"sha256={expected}")
            assert abs(time.time() - int(timestamp)) < 300
            assert headers["X-MergeForge-Delivery"] == f"{job_id}.succeeded"
            wait_until(lambda: any(e["stage"] == "webhook" and "204" in e["message"]
                                   for e in client.get(f"/v1/merges/{job_id}/events").json()["items"]),
                       30, "the webhook event")
            # The secret is write-only.
            for path in (f"/v1/merges/{job_id}", "/v1/merges"):
                assert secret not in client.get(path).text
            short = client.post("/v1/merges", json={**spec, "webhook_secret": "short"})
            assert short.status_code == 422 and "webhook_secret" in short.text
    finally:
        server.shutdown()


def test_webhook_of_a_job_cancelled_while_queued(tmp_path, s3_server, stored_family):
    server, received = _receiver()
    try:
        with running_service(tmp_path / "svc", s3_server, worker=False) as service, service.client() as client:
            spec = {"method": "task_arithmetic", "base_model": stored_family["base"],
                    "models": [{"model": stored_family["task0"]}],
                    "webhook_url": f"http://127.0.0.1:{server.server_address[1]}/hook"}
            job_id = client.post("/v1/merges", json=spec).json()["id"]
            assert client.post(f"/v1/merges/{job_id}/cancel").json()["status"] == "cancelled"
            service.start_worker()  # no worker ran the job; one delivers the webhook
            headers, raw = received.get(timeout=120)
            body = json.loads(raw)
            assert body["event"] == "merge.cancelled" and body["job"]["id"] == job_id
            assert "X-MergeForge-Signature" not in headers  # no secret, no signature
            assert client.get(f"/v1/merges/{job_id}").json()["status"] == "cancelled"
    finally:
        server.shutdown()


def test_webhooks_to_private_addresses_are_refused(tmp_path, s3_server, stored_family):
    """Without MERGEFORGE_WEBHOOK_ALLOW_PRIVATE a tenant cannot make the service call inside the deployment: at
    submit (IP literals and names that resolve inside) and again at delivery."""
    from app.core.jobstore import JobStore
    from workers.jobs import deliver_webhook

    spec = {"method": "task_arithmetic", "base_model": stored_family["base"],
            "models": [{"model": stored_family["task0"]}]}
    env = {"MERGEFORGE_WEBHOOK_ALLOW_PRIVATE": "false"}
    server, received = _receiver()
    try:
        with running_service(tmp_path / "svc", s3_server, worker=False, extra_env=env) as service, \
                service.client() as client:
            for url in ("http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://169.254.169.254/latest",
                        "http://10.1.2.3/hook", "http://[::1]:9/hook"):
                refused = client.post("/v1/merges", json={**spec, "webhook_url": url})
                assert refused.status_code == 422 and "private or reserved" in refused.json()["detail"], url
            job_id = client.post("/v1/merges", json={**spec, "webhook_url": "http://8.8.8.8/hook"}).json()["id"]
            client.post(f"/v1/merges/{job_id}/cancel")
            # At delivery the address is checked again: a name may resolve elsewhere by then.
            store = JobStore.from_url(service.redis.url)
            job = store.get(job_id).model_copy(update={"webhook_url": f"http://localhost:{server.server_address[1]}/"})
            deliver_webhook(store, job, allow_private=False)
            events = client.get(f"/v1/merges/{job_id}/events").json()["items"]
            assert "webhook refused" in events[-1]["message"] and received.empty()
    finally:
        server.shutdown()
