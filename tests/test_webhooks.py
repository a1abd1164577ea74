"""Webhooks: a job that names `webhook_url` is POSTed to it when it ends."""

from __future__ import annotations

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from servers import running_service, wait_for_job, wait_until


def _receiver():
    received: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.put((self.headers["Content-Type"], json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def test_webhook_receives_the_ended_job(service, stored_family):
    server, received = _receiver()
    try:
        spec = {"method": "task_arithmetic", "base_model": stored_family["base"],
                "models": [{"model": stored_family["task0"]}, {"model": stored_family["task1"]}],
                "webhook_url": f"http://127.0.0.1:{server.server_address[1]}/hooks/merge"}
        with service.client() as client:
            job_id = client.post("/v1/merges", json=spec).json()["id"]
            done = wait_for_job(client, job_id, {"succeeded", "failed"})
            assert done["status"] == "succeeded", done["error"]
            content_type, body = received.get(timeout=60)
            assert content_type == "application/json"
            assert body["event"] == "merge.succeeded" and body["job"]["id"] == job_id
            assert body["job"]["status"] == "succeeded" and body["job"]["artifacts"]
            assert "tenant" not in body["job"]
            wait_until(lambda: any(e["stage"] == "webhook" and "204" in e["message"]
                                   for e in client.get(f"/v1/merges/{job_id}/events").json()["items"]),
                       30, "the webhook event")
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
            _, body = received.get(timeout=120)
            assert body["event"] == "merge.cancelled" and body["job"]["id"] == job_id
            assert client.get(f"/v1/merges/{job_id}").json()["status"] == "cancelled"
    finally:
        server.shutdown()
