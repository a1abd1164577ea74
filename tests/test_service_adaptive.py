"""Adaptive merges through the service: HTTP in, S3 checkpoints and data, a real worker, artifacts and events out;
a worker killed mid-adaptation resumes from the coefficients it saved."""

from __future__ import annotations

import json
import time
from urllib.parse import urlparse

import pytest
from adaptive_family import build_adaptive_family
from servers import BUCKET, running_service, wait_for_job

ENDED = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def stored(tmp_path_factory, s3_server) -> dict:
    family = build_adaptive_family(tmp_path_factory.mktemp("adaptive-stored"))
    client = s3_server.client()
    data = []
    for path in family.data:
        client.upload_file(str(path), BUCKET, f"adaptive/data/{path.name}")
        data.append(f"s3://{BUCKET}/adaptive/data/{path.name}")
    return {"base": s3_server.upload_folder(family.base, "adaptive/base"),
            "tasks": [s3_server.upload_folder(t, f"adaptive/{t.name}") for t in family.tasks], "data": data}


def spec(stored: dict, method: str = "adamerging", data: list[str] | None = None, **parameters) -> dict:
    return {"method": method, "base_model": stored["base"], "parameters": {"lr": 0.05, **parameters},
            "models": [{"model": t, "name": f"task{k}", "data": d}
                       for k, (t, d) in enumerate(zip(stored["tasks"], data or stored["data"], strict=True))]}


def get_json(s3_server, uri: str) -> dict:
    parsed = urlparse(uri)
    return json.loads(s3_server.client().get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"].read())


def keys_under(s3_server, uri: str) -> list[str]:
    parsed = urlparse(uri)
    listed = s3_server.client().list_objects_v2(Bucket=parsed.netloc, Prefix=parsed.path.lstrip("/") + "/")
    return [o["Key"] for o in listed.get("Contents", [])]


def events(client, job_id: str) -> list[dict]:
    return client.get(f"/v1/merges/{job_id}/events", params={"limit": 1000}).json()["items"]


@pytest.mark.parametrize("method", ["adamerging", "tinting"])
def test_adaptive_job_end_to_end(service, stored, s3_server, method):
    with service.client() as client:
        response = client.post("/v1/merges", json=spec(stored, method, steps=12))
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["queue"] == "gpu"  # adaptive methods are routed to GPU workers (the test worker takes both)
        done = wait_for_job(client, job["id"], ENDED, timeout=300)
        assert done["status"] == "succeeded", (done["error"], service.logs())
        paths = {a["path"]: a["uri"] for a in done["artifacts"]}
        assert {"coefficients.json", "coefficients.png", "loss_curve.json", "loss_curve.png", "README.md",
                "model.safetensors", "heads/task0.safetensors", "merge_manifest.json"} <= set(paths)
        table = get_json(s3_server, paths["coefficients.json"])
        assert set(table["coefficients"]) == {"task0", "task1", "task2"}
        curve = get_json(s3_server, paths["loss_curve.json"])
        assert [p["step"] for p in curve["points"]] == list(range(1, 13))
        stepped = [e for e in events(client, job["id"]) if e["stage"] == "adapt" and e["metrics"]]
        assert stepped and set(stepped[-1]["metrics"]["tasks"]) == {"task0", "task1", "task2"}
        assert not keys_under(s3_server, f"{done['output']}/state")  # the resumable state is gone once done


def test_bad_data_fails_with_the_input_named(service, stored, s3_server):
    s3_server.client().put_object(Bucket=BUCKET, Key="adaptive/data/empty.jsonl", Body=b"")
    empty = f"s3://{BUCKET}/adaptive/data/empty.jsonl"
    missing = f"s3://{BUCKET}/adaptive/data/missing.jsonl"
    with service.client() as client:
        for data, code, fragment in ((empty, "invalid_data", "the file is empty"),
                                     (missing, "input_not_found", missing)):
            body = spec(stored, data=[stored["data"][0], data, stored["data"][2]], steps=2)
            job = client.post("/v1/merges", json=body).json()
            done = wait_for_job(client, job["id"], ENDED, timeout=120)
            assert done["status"] == "failed" and done["error"]["code"] == code, done["error"]
            assert fragment in done["error"]["message"]
            assert "/inputs/" not in done["error"]["message"] and "/data/1" not in done["error"]["message"]


def test_data_uris_are_checked_at_submit(service, stored):
    with service.client() as client:
        body = spec(stored, data=["file:///etc/passwd", *stored["data"][1:]])
        response = client.post("/v1/merges", json=body)
        assert response.status_code == 422 and "models.0.data" in response.json()["detail"]
        without = spec(stored)
        del without["models"][1]["data"]
        response = client.post("/v1/merges", json=without)
        assert response.status_code == 422 and "set `data`" in response.json()["detail"]


def test_worker_killed_mid_adaptation_resumes_from_saved_state(tmp_path, s3_server, stored):
    with running_service(tmp_path / "service", s3_server) as service, service.client() as client:
        job = client.post("/v1/merges", json=spec(stored, steps=300, save_every=10, lr=0.01)).json()
        reached = []
        for _ in range(600):
            reached = [e for e in events(client, job["id"]) if e["metrics"].get("step", 0) >= 25]
            if reached:
                break
            assert client.get(f"/v1/merges/{job['id']}").json()["status"] not in ENDED
            time.sleep(0.2)
        assert reached, service.logs()
        service.kill_worker()
        service.start_worker("w2")
        done = wait_for_job(client, job["id"], ENDED, timeout=600)
        assert done["status"] == "succeeded" and done["attempts"] == 2, (done["error"], service.logs())
        table = get_json(s3_server, next(a["uri"] for a in done["artifacts"] if a["path"] == "coefficients.json"))
        assert table["resumed_from_step"] >= 20 and table["resumed_from_step"] % 10 == 0
        messages = [e["message"] for e in events(client, job["id"])]
        assert "found the state a previous attempt saved" in messages


def test_cancel_stops_an_adaptation_between_steps(service, stored, s3_server):
    with service.client() as client:
        job = client.post("/v1/merges", json=spec(stored, steps=100_000, save_every=5, lr=0.01)).json()
        for _ in range(600):
            if any(e["metrics"].get("step", 0) >= 5 for e in events(client, job["id"])):
                break
            time.sleep(0.2)
        response = client.post(f"/v1/merges/{job['id']}/cancel")
        assert response.status_code == 200, response.text
        done = wait_for_job(client, job["id"], ENDED, timeout=60)
        assert done["status"] == "cancelled" and not done["artifacts"]
        steps = [e["metrics"]["step"] for e in events(client, job["id"]) if e["metrics"].get("step")]
        assert steps and max(steps) < 100_000
        assert not keys_under(s3_server, done["output"])  # neither artifacts nor the saved state are left
