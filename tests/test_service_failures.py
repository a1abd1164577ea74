"""Failures through the real service (HTTP API, a Celery worker, Redis, SeaweedFS S3): every job error code from a
real bad input, submit-time refusals, checkpoint registration, a worker SIGKILLed mid-merge and Redis restarted
mid-run."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import uuid
from urllib.parse import urlparse

import httpx
import pytest
import torch
from conftest import write_safetensors
from safetensors.torch import load, save
from servers import BUCKET, Service, running_service, wait_for_job

ENDED = {"succeeded", "failed", "cancelled"}
PROBLEM_JSON = "application/problem+json"
RESHAPED = "encoder.layer.1.attention.self.query.weight"  # a body tensor of the tiny BERT, (32, 32) in the base
SLOW_TENSORS, SLOW_SHAPE = 240, (512, 512)  # bf16 inputs (half the upload of f32, more work per byte): 8-15 s


# --- helpers -----------------------------------------------------------------------------------------------------


def _key(uri: str) -> str:
    return urlparse(uri).path.lstrip("/")


def _get_bytes(s3_server, uri: str) -> bytes:
    return s3_server.client().get_object(Bucket=BUCKET, Key=_key(uri))["Body"].read()


def _put(s3_server, key: str, data: bytes) -> str:
    s3_server.client().put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}"


def _objects(s3_server, uri: str) -> dict[str, int]:
    """Every object under the folder-like `uri`: s3:// URI -> size."""
    paginator = s3_server.client().get_paginator("list_objects_v2")
    out = {}
    for page in paginator.paginate(Bucket=BUCKET, Prefix=_key(uri).rstrip("/") + "/"):
        out.update({f"s3://{BUCKET}/{o['Key']}": int(o["Size"]) for o in page.get("Contents", [])})
    return out


def _header(data: bytes) -> tuple[dict, int]:
    """A safetensors file's header (without __metadata__) and where its data section starts."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    return header, 8 + length


def _spec(base: str, models: list[tuple[str, str]], method: str = "task_arithmetic", **extra) -> dict:
    return {"method": method, "base_model": base, "models": [{"model": m, "name": n} for m, n in models], **extra}


def _tiny_spec(family: dict[str, str], **extra) -> dict:
    return _spec(family["base"], [(family[f"task{i}"], f"task{i}") for i in range(3)], method="ties",
                 parameters={"density": 0.5}, **extra)


def _submit(client: httpx.Client, spec: dict) -> dict:
    response = client.post("/v1/merges", json=spec)
    assert response.status_code == 202, response.text
    return response.json()


def _job(client: httpx.Client, job_id: str) -> dict:
    response = client.get(f"/v1/merges/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def _fails(service: Service, spec: dict, code: str) -> dict:
    """Submit `spec`, expect the job to end `failed` with `code`; returns the job's error."""
    with service.client() as client:
        job = _submit(client, spec)
        done = wait_for_job(client, job["id"], ENDED, timeout=180)
    assert done["status"] == "failed", (done, service.logs())
    assert done["error"]["code"] == code, (done["error"], service.logs())
    assert done["artifacts"] == [] and done["stage"] == "failed"
    return done["error"]


def _problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert body["code"] == code and body["status"] == status, body
    assert body["type"].endswith(f"/{code}") and body["detail"], body
    return body


def _newest_job(client: httpx.Client) -> str | None:
    items = client.get("/v1/merges", params={"limit": 1}).json()["items"]
    return items[0]["id"] if items else None


def _wait_stage(client: httpx.Client, job_id: str, stages: set[str], timeout: float = 240) -> dict:
    """Poll until the job runs in one of `stages`; fail at once if it ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(client, job_id)
        assert job["status"] not in ENDED, f"job ended before reaching {stages}: {job}"
        if job["status"] == "running" and job["stage"] in stages and job["progress"] > 0.1:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} never reached {stages}")


# --- bad inputs, stored in S3 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(s3_server, stored_family) -> dict[str, str]:
    """s3:// URIs of broken checkpoints, made from the stored tiny BERT family."""
    prefix = f"failures/{uuid.uuid4().hex[:8]}"
    uris = {}
    # A folder holding only a pickle: its bytes do not matter, it must never be loaded.
    _put(s3_server, f"{prefix}/pickled/pytorch_model.bin", b"\x80\x04 not really a pickle, never to be read")
    uris["pickled"] = f"s3://{BUCKET}/{prefix}/pickled"
    # Nothing at all under this URI.
    uris["missing"] = f"s3://{BUCKET}/{prefix}/no-such-model"
    # task1 with one body tensor of another shape.
    config = _get_bytes(s3_server, f"{stored_family['task1']}/config.json")
    tensors = load(_get_bytes(s3_server, f"{stored_family['task1']}/model.safetensors"))
    assert tensors[f"bert.{RESHAPED}"].shape == (32, 32)
    tensors[f"bert.{RESHAPED}"] = torch.randn(16, 32)
    _put(s3_server, f"{prefix}/reshaped/config.json", config)
    _put(s3_server, f"{prefix}/reshaped/model.safetensors", save(tensors, metadata={"format": "pt"}))
    uris["reshaped"] = f"s3://{BUCKET}/{prefix}/reshaped"
    # task2's weights cut to 60%: the header is whole, the data is not.
    data = _get_bytes(s3_server, f"{stored_family['task2']}/model.safetensors")
    _put(s3_server, f"{prefix}/truncated/config.json", _get_bytes(s3_server, f"{stored_family['task2']}/config.json"))
    _put(s3_server, f"{prefix}/truncated/model.safetensors", data[: len(data) * 6 // 10])
    uris["truncated"] = f"s3://{BUCKET}/{prefix}/truncated"
    header, data_start = _header(data)
    kept = len(data) * 6 // 10 - data_start
    uris["truncated_tensors"] = json.dumps(sorted(n for n, e in header.items() if e["data_offsets"][1] > kept))
    return uris


def test_pickle_only_folder_fails_unsafe_format(service, stored_family, bad_inputs):
    error = _fails(service, _spec(stored_family["base"], [(stored_family["task0"], "good"),
                                                           (bad_inputs["pickled"], "pickled")]), "unsafe_format")
    message = error["message"]
    assert "pytorch_model.bin" in message and "pickle" in message and "safe_serialization=True" in message, message


def test_missing_input_fails_input_not_found(service, stored_family, bad_inputs):
    error = _fails(service, _spec(stored_family["base"], [(stored_family["task0"], "good"),
                                                           (bad_inputs["missing"], "missing")]), "input_not_found")
    assert f"{bad_inputs['missing']}: no such object or folder" in error["message"], error


def test_shape_mismatch_fails_incompatible_checkpoints(service, stored_family, bad_inputs):
    error = _fails(service, _spec(stored_family["base"], [(stored_family["task0"], "good"),
                                                           (bad_inputs["reshaped"], "reshaped")]),
                   "incompatible_checkpoints")
    message = error["message"]
    assert f"{RESHAPED} (base [32, 32], reshaped [16, 32] F32)" in message, message
    assert "1 tensor(s) differ in shape" in message and "good" not in message, message
    assert error["detail"]["mismatched"] == [{"tensor": RESHAPED, "model": "reshaped", "shape": [16, 32],
                                              "dtype": "F32", "base_shape": [32, 32]}], error["detail"]


def test_truncated_safetensors_fails_invalid_checkpoint(service, stored_family, bad_inputs):
    error = _fails(service, _spec(stored_family["base"], [(stored_family["task0"], "good"),
                                                           (bad_inputs["truncated"], "truncated")]),
                   "invalid_checkpoint")
    message = error["message"]
    assert "model.safetensors" in message and "truncated" in message, message
    named = re.search(r"tensor '([^']+)'", message)
    assert named and named.group(1) in json.loads(bad_inputs["truncated_tensors"]), message


@pytest.mark.parametrize(("bad", "code", "file"), [("pickled", "unsafe_format", "pytorch_model.bin"),
                                                   ("truncated", "invalid_checkpoint", "model.safetensors")])
def test_job_error_names_the_submitted_object(service, stored_family, bad_inputs, bad, code, file):
    error = _fails(service, _spec(stored_family["base"], [(stored_family["task0"], "good"), (bad_inputs[bad], bad)]),
                   code)
    where = f"{bad_inputs[bad]}/{file}"
    assert error["message"].startswith(f"{where}: ") and error["detail"]["file"] == where, error
    assert str(service.root) not in json.dumps(error), error


# --- refused at submit time --------------------------------------------------------------------------------------


def test_submit_time_refusals(service, stored_family):
    good = _tiny_spec(stored_family)
    with service.client() as client:
        newest = _newest_job(client)

        body = _problem(client.post("/v1/merges", json={**good, "parameters": {"density": 1.5}}), 422,
                        "invalid_parameters")
        assert "density" in body["detail"] and "less than or equal to 1" in body["detail"], body
        assert body["errors"] and any("density" in e["loc"] for e in body["errors"]), body

        body = _problem(client.post("/v1/merges", json={**good, "method": "no_such_method"}), 422,
                        "invalid_parameters")
        assert "no_such_method" in body["detail"] and "unknown merge method" in body["detail"], body
        assert body["errors"][0]["loc"] == ["body", "method"], body

        outside = "file:///etc/mergeforge-secret-model"
        body = _problem(client.post("/v1/merges", json={**good, "base_model": outside}), 422, "invalid_parameters")
        assert body["detail"].startswith(f"base_model: {outside} is outside the folders"), body
        escaped = f"file://{service.root}/../../etc"
        body = _problem(client.post("/v1/merges", json={**good, "models": [{"model": escaped, "name": "x"},
                                                                           *good["models"][1:]]}),
                        422, "invalid_parameters")
        assert body["detail"].startswith("models.0.model:") and "'..'" in body["detail"], body

        other = f"s3://{BUCKET}/artifacts/tenant-b/x"
        body = _problem(client.post("/v1/merges", json={**good, "output": other}), 422, "invalid_parameters")
        assert body["detail"].startswith("output:") and f"s3://{BUCKET}/artifacts/tenant-a/" in body["detail"], body

        assert _newest_job(client) == newest, "a refused submission created a job"


def test_bad_parameter_problem_locates_the_field(service, stored_family):
    with service.client() as client:
        body = _problem(client.post("/v1/merges", json={**_tiny_spec(stored_family), "parameters": {"density": 1.5}}),
                        422, "invalid_parameters")
    assert body["errors"][0]["loc"] == ["body", "parameters", "density"], body


@pytest.mark.parametrize("spelling", ["s3://{bucket}//artifacts/tenant-b/x", "S3://{bucket}/artifacts/tenant-b/x"])
def test_output_in_another_tenants_prefix_refused_however_spelled(service, s3_server, stored_family, spelling):
    with service.client() as client:
        output = spelling.format(bucket=BUCKET)
        response = client.post("/v1/merges", json={**_tiny_spec(stored_family), "output": output})
        written = []
        if response.status_code == 202:  # let the job end (the shared worker is left idle) and see where it wrote
            job_id = response.json()["id"]
            wait_for_job(client, job_id, ENDED, timeout=180)
            written = sorted(_objects(s3_server, f"s3://{BUCKET}/artifacts/tenant-b/x/{job_id}"))
            client.delete(f"/v1/merges/{job_id}")  # and clean tenant-b's prefix up for the tests that follow
            for uri in _objects(s3_server, f"s3://{BUCKET}/artifacts/tenant-b/x/{job_id}"):
                s3_server.client().delete_object(Bucket=BUCKET, Key=_key(uri))
    assert response.status_code == 422, (response.status_code, written)


def test_file_uri_outside_roots_refused_whatever_its_case(service, tmp_path):
    outside = {name: write_safetensors(tmp_path / name / "model.safetensors",
                                       {"secret.weight": torch.full((3, 5), float(i))}).parent
               for i, name in enumerate(("base", "task"))}
    assert not any(service.root in p.parents for p in outside.values())
    with service.client() as client:
        registered = client.post("/v1/checkpoints", json={"uri": f"FILE://{outside['base']}"})
        submitted = client.post("/v1/merges", json=_spec(f"FILE://{outside['base']}",
                                                         [(f"FILE://{outside['task']}", "task")]))
        ended = None
        if submitted.status_code == 202:  # let the job end, so the shared worker is left idle
            ended = wait_for_job(client, submitted.json()["id"], ENDED, timeout=180)["status"]
    assert (registered.status_code, submitted.status_code) == (422, 422), (registered.json().get("tensors"), ended)


# --- registered checkpoints --------------------------------------------------------------------------------------


def test_checkpoint_registration(service, s3_server, stored_family, bad_inputs):
    with service.client() as client, service.client("tenant-b") as other:
        ids = {}
        for name in ("base", "task0", "task1", "task2"):
            response = client.post("/v1/checkpoints", json={"uri": stored_family[name]})
            assert response.status_code == 201, response.text
            ckpt = response.json()
            assert response.headers["location"] == f"/v1/checkpoints/{ckpt['id']}"
            assert ckpt["id"].startswith("ckpt_") and ckpt["uri"] == stored_family[name]
            stored = _objects(s3_server, stored_family[name])
            folder = stored_family[name] + "/"
            assert ckpt["files"] == [{"name": u[len(folder):], "size": s} for u, s in sorted(stored.items())]
            assert ckpt["size"] == sum(stored.values())
            header, _ = _header(_get_bytes(s3_server, f"{folder}model.safetensors"))
            assert ckpt["tensor_count"] == len(header)
            assert ckpt["tensors"] == {n: {"dtype": e["dtype"], "shape": e["shape"], "file": "model.safetensors"}
                                       for n, e in header.items()}
            ids[name] = ckpt["id"]

        base = client.get(f"/v1/checkpoints/{ids['base']}")
        assert base.status_code == 200 and base.json()["tensors"]["embeddings.word_embeddings.weight"] == {
            "dtype": "F32", "shape": [120, 32], "file": "model.safetensors"}, base.text
        listed = {c["id"]: c for c in client.get("/v1/checkpoints").json()["items"]}
        assert set(ids.values()) <= set(listed)
        assert all(listed[i]["tensors"] is None and listed[i]["tensor_count"] > 0 for i in ids.values())

        _problem(other.get(f"/v1/checkpoints/{ids['base']}"), 404, "not_found")
        assert not set(ids.values()) & {c["id"] for c in other.get("/v1/checkpoints").json()["items"]}
        body = _problem(other.post("/v1/merges", json=_spec(ids["base"], [(ids["task0"], "a")])), 422,
                        "input_not_found")
        assert ids["base"] in body["detail"], body

        registered = _spec(ids["base"], [(ids[f"task{i}"], f"task{i}") for i in range(3)], method="ties",
                           parameters={"density": 0.5})
        job = _submit(client, registered)
        assert job["spec"]["base_model"] == ids["base"]
        done = wait_for_job(client, job["id"], ENDED, timeout=180)
        assert done["status"] == "succeeded", (done["error"], service.logs())
        assert {"model.safetensors", "merge_manifest.json", "heads/task2.safetensors"} <= {
            a["path"] for a in done["artifacts"]}

        reshaped = client.post("/v1/checkpoints", json={"uri": bad_inputs["reshaped"]})
        assert reshaped.status_code == 201, reshaped.text
        assert reshaped.json()["tensors"][f"bert.{RESHAPED}"]["shape"] == [16, 32]
        newest = _newest_job(client)
        body = _problem(client.post("/v1/merges", json=_spec(ids["base"], [(ids["task0"], "good"),
                                                                           (reshaped.json()["id"], "reshaped")])),
                        422, "incompatible_checkpoints")
        assert f"{RESHAPED} (base [32, 32], reshaped [16, 32] F32)" in body["detail"], body
        assert _newest_job(client) == newest, "an incompatible submission created a job"

        body = _problem(client.post("/v1/checkpoints", json={"uri": bad_inputs["pickled"]}), 422, "unsafe_format")
        assert f"{bad_inputs['pickled']}/pytorch_model.bin: pickle checkpoints" in body["detail"], body
        body = _problem(client.post("/v1/checkpoints", json={"uri": bad_inputs["missing"]}), 422, "input_not_found")
        assert f"{bad_inputs['missing']}: no such object or folder" in body["detail"], body
        body = _problem(client.post("/v1/checkpoints", json={"uri": "file:///etc"}), 422, "invalid_parameters")
        assert body["detail"].startswith("uri: file:///etc is outside the folders"), body
        body = _problem(client.post("/v1/checkpoints", json={"uri": bad_inputs["truncated"]}), 422,
                        "invalid_checkpoint")
        assert "model.safetensors" in body["detail"] and "truncated" in body["detail"], body


# --- a slow merge, on a stack of its own ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_family(tmp_path_factory, s3_server) -> dict[str, str]:
    """A synthetic base and 3 task models of SLOW_TENSORS bf16 512x512 tensors in S3: a merge of several seconds."""
    root = tmp_path_factory.mktemp("slow")
    prefix = f"failures/slow-{uuid.uuid4().hex[:8]}"
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(SLOW_TENSORS, *SLOW_SHAPE, generator=generator)
    uris = {}
    for name in ("base", "task0", "task1", "task2"):
        values = base if name == "base" else base + 0.01 * torch.randn(base.shape, generator=generator)
        path = write_safetensors(root / name / "model.safetensors",
                                 {f"layers.{i}.weight": values[i].to(torch.bfloat16) for i in range(SLOW_TENSORS)})
        uris[name] = s3_server.upload_folder(path.parent, f"{prefix}/{name}")
        path.unlink()
    return uris


def _slow_spec(family: dict[str, str]) -> dict:
    return _spec(family["base"], [(family[f"task{i}"], f"task{i}") for i in range(3)], method="ties",
                 parameters={"density": 0.2, "scope": "global"}, lwptv={"q": 0.1}, task_specific=[])


@pytest.fixture
def own_service(tmp_path, s3_server):
    """Redis, the API and one worker of this test's own, so the shared session service is left untouched."""
    with running_service(tmp_path / "service", s3_server) as svc:
        yield svc


def test_worker_killed_mid_merge_is_requeued_and_leaves_one_attempt(own_service, slow_family, s3_server):
    service = own_service
    with service.client() as client:
        job = _submit(client, _slow_spec(slow_family))
        running = _wait_stage(client, job["id"], {"merge"})
        assert running["attempts"] == 1
        service.kill_worker()
        assert _job(client, job["id"])["status"] == "running"  # nobody is left to say otherwise
        service.start_worker("w2")
        done = wait_for_job(client, job["id"], ENDED, timeout=300)
        assert done["status"] == "succeeded", (done["error"], service.logs())
        assert done["attempts"] == 2 and done["progress"] == 1.0, done
        stages = [e["stage"] for e in client.get(f"/v1/merges/{job['id']}/events",
                                                params={"limit": 1000}).json()["items"]]
        assert "requeued" in stages and stages[-1] == "succeeded", stages

        stored = _objects(s3_server, done["output"])
        attempt = f"{done['output']}/attempt-2/"
        assert stored and all(uri.startswith(attempt) for uri in stored), sorted(stored)
        artifacts = {a["uri"]: a for a in done["artifacts"]}
        assert set(stored) == set(artifacts), (sorted(stored), sorted(artifacts))
        assert all(stored[uri] == a["size"] for uri, a in artifacts.items())
        manifest_uri = f"{attempt}merge_manifest.json"
        manifest_bytes = _get_bytes(s3_server, manifest_uri)
        assert hashlib.sha256(manifest_bytes).hexdigest() == artifacts[manifest_uri]["sha256"]
        manifest = json.loads(manifest_bytes)
        assert {o["path"]: o["sha256"] for o in manifest["outputs"]} == {
            a["path"]: a["sha256"] for a in done["artifacts"] if a["path"] != "merge_manifest.json"}
        model = _get_bytes(s3_server, f"{attempt}model.safetensors")
        assert hashlib.sha256(model).hexdigest() == artifacts[f"{attempt}model.safetensors"]["sha256"]
        assert len(_header(model)[0]) == SLOW_TENSORS


def test_redis_restart_mid_run_loses_no_job(own_service, slow_family, stored_family):
    service = own_service
    with service.client() as client:
        finished = [_submit(client, _tiny_spec(stored_family, metadata={"n": str(i)}))["id"] for i in range(2)]
        before = {}
        for job_id in finished:
            done = wait_for_job(client, job_id, ENDED, timeout=180)
            assert done["status"] == "succeeded", (done["error"], service.logs())
            before[job_id] = done
        slow = _submit(client, _slow_spec(slow_family))["id"]
        queued = _submit(client, _tiny_spec(stored_family, metadata={"n": "queued"}))["id"]
        _wait_stage(client, slow, {"lwptv", "thresholds", "merge"})
        assert _job(client, queued)["status"] == "queued"
        events = {job_id: client.get(f"/v1/merges/{job_id}/events").json()["items"] for job_id in finished}

        service.redis.stop()
        service.redis.start()
        assert _job(client, slow)["status"] in ("running", "queued")  # restarted mid-run, not after it

        done = wait_for_job(client, slow, ENDED, timeout=300)
        assert done["status"] == "succeeded", (done["error"], service.logs())
        assert done["attempts"] in (1, 2), done
        done_queued = wait_for_job(client, queued, ENDED, timeout=180)
        assert done_queued["status"] == "succeeded", (done_queued["error"], service.logs())
        assert done_queued["metadata"] == {"n": "queued"}
        for job_id, job in before.items():
            assert _job(client, job_id) == job
            assert client.get(f"/v1/merges/{job_id}/events").json()["items"] == events[job_id]
        listed = {j["id"]: j["status"] for j in client.get("/v1/merges").json()["items"]}
        assert listed == {**dict.fromkeys(finished, "succeeded"), slow: "succeeded", queued: "succeeded"}
