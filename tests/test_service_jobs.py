"""The merge-job lifecycle through the HTTP API against real servers: cancel (queued and running), idempotent
submission, tenant isolation, listing, progress events (paged and SSE), delete, health and metrics, and problem
details on every error.

Two services: the session's `service` (Redis, S3, one Celery worker, the API) runs jobs; `idle_service` is an API
with its own Redis and no worker, so its jobs stay queued for as long as a test needs."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import KEYS, Service, running_service, wait_for_job, wait_until
from slow_models import build_slow_family, slow_spec

from app.core.config import hash_key

PROBLEM = "application/problem+json"
JOB_TIMEOUT = 180.0
TERMINAL = {"succeeded", "failed", "cancelled"}
# The job's stage while the worker is inside the engine (workers/engine/merge.py `Progress.stage`).
ENGINE_STAGES = {"validate", "lwptv", "thresholds", "merge"}
# Tenants only the idle service knows: their job lists hold only what the listing tests put there.
LISTER = ("tenant-c", "key-c-0123456789")
DEEP_LISTER = ("tenant-d", "key-d-0123456789")


# --------------------------------------------------------------------------------------------------- helpers
def assert_problem(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """An RFC 9457 problem: the media type and the members every MergeForge error carries."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0].strip() == PROBLEM, response.headers
    body = response.json()
    for member in ("type", "title", "status", "detail", "code"):
        assert isinstance(body.get(member), int if member == "status" else str) and body[member] != "", (member, body)
    assert body["status"] == status, body
    if code is not None:
        assert body["code"] == code, body
    return body


def client_for(svc: Service, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=svc.url, headers=headers, timeout=30)


def tiny_spec(uris: dict[str, str], **extra) -> dict:
    return {"method": "ties", "base_model": uris["base"],
            "models": [{"model": uris[f"task{i}"], "name": f"task{i}"} for i in range(3)],
            "parameters": {"density": 0.5}, **extra}


def submit(client: httpx.Client, body: dict, key: str | None = None) -> dict:
    response = client.post("/v1/merges", json=body, headers={"Idempotency-Key": key} if key else {})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/merges/{job['id']}"
    return job


def s3_keys(s3_server, uri: str) -> list[str]:
    """Every object under the folder-like prefix `uri` (s3://bucket/prefix)."""
    parsed = urlparse(uri)
    prefix = parsed.path.strip("/") + "/"
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=parsed.netloc, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def all_events(client: httpx.Client, job_id: str) -> list[dict]:
    response = client.get(f"/v1/merges/{job_id}/events", params={"limit": 1000})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["next"] is None
    return body["items"]


def read_sse(client: httpx.Client, job_id: str, last_event_id: str | None = None,
             timeout: float = JOB_TIMEOUT) -> tuple[str, list[dict[str, str]]]:
    """The stream's content type and its frames (field -> value; comments dropped), read until the server closes."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    deadline = time.monotonic() + timeout
    frames: list[dict[str, str]] = []
    current: dict[str, str] = {}
    with client.stream("GET", f"/v1/merges/{job_id}/events/stream", headers=headers,
                       timeout=httpx.Timeout(30, read=60)) as response:
        assert response.status_code == 200, response.read()
        content_type = response.headers["content-type"]
        assert response.headers.get("cache-control") == "no-cache", response.headers
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"the event stream of {job_id} did not end within {timeout} s"
            if line == "":
                if current:
                    frames.append(current)
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                current[field] = value.removeprefix(" ")
    if current:
        frames.append(current)
    return content_type, frames


def list_pages(client: httpx.Client, limit: int, **params) -> list[list[str]]:
    """GET /v1/merges page by page, following `next` as `after`: the ids of each page."""
    out, after = [], None
    while True:
        query = {"limit": limit, **params, **({"after": after} if after else {})}
        response = client.get("/v1/merges", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= limit
        out.append([j["id"] for j in page["items"]])
        if page["next"] is None:
            return out
        assert page["next"] == page["items"][-1]["id"]
        after = page["next"]
        assert len(out) < 100, out


def stream_id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def samples(metrics_text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(metrics_text) for s in family.samples}


def metric(table: dict, name: str, **labels: str) -> float:
    return table.get((name, frozenset(labels.items())), 0.0)


def scrape(client: httpx.Client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return samples(response.text)


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def idle_service(tmp_path_factory, s3_server):
    """The API on its own Redis with no worker: what it enqueues stays queued."""
    keys = {**KEYS, LISTER[0]: LISTER[1], DEEP_LISTER[0]: DEEP_LISTER[1]}
    env = {"MERGEFORGE_API_KEYS": json.dumps({hash_key(k): t for t, k in keys.items()})}
    with running_service(tmp_path_factory.mktemp("idle-service"), s3_server, worker=False, extra_env=env) as svc:
        yield svc


@pytest.fixture(scope="module")
def streamed_job(service, stored_family) -> dict:
    """A small merge run by the worker, its event stream read live from submission until the server closed it."""
    with service.client() as client:
        job = submit(client, tiny_spec(stored_family, metadata={"test": "sse"}))
        content_type, frames = read_sse(client, job["id"])
        done = wait_for_job(client, job["id"], TERMINAL, timeout=JOB_TIMEOUT)
    assert done["status"] == "succeeded", (done["error"], service.logs())
    return {"job": done, "content_type": content_type, "frames": frames}


@pytest.fixture(scope="module")
def slow_family(tmp_path_factory, s3_server) -> dict[str, str]:
    folders = build_slow_family(tmp_path_factory.mktemp("slow-family"))
    return {name: s3_server.upload_folder(folder, f"slow/{name}") for name, folder in folders.items()}


# ------------------------------------------------------------------------------------------------ 1. cancel
def test_cancel_queued_job_is_cancelled_at_once(idle_service, stored_family, s3_server):
    with idle_service.client() as client:
        job = submit(client, tiny_spec(stored_family))
        assert job["status"] == "queued" and job["stage"] == "queued" and job["attempts"] == 0
        assert job["output"] == f"s3://mergeforge/artifacts/tenant-a/{job['id']}"
        assert_problem(client.delete(f"/v1/merges/{job['id']}"), 409, "conflict")  # not ended yet
        assert_problem(client.get(f"/v1/merges/{job['id']}/artifacts"), 409, "conflict")

        cancelled = client.post(f"/v1/merges/{job['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        body = cancelled.json()
        assert body["id"] == job["id"] and body["status"] == "cancelled" and body["stage"] == "cancelled"
        assert body["finished_at"] is not None and body["artifacts"] == [] and body["error"] is None
        assert client.get(f"/v1/merges/{job['id']}").json()["status"] == "cancelled"

        assert_problem(client.post(f"/v1/merges/{job['id']}/cancel"), 409, "conflict")
        assert_problem(client.get(f"/v1/merges/{job['id']}/artifacts"), 409, "conflict")
        events = all_events(client, job["id"])
        assert [e["status"] for e in events if e["status"]] == ["queued", "cancelled"]
        _, frames = read_sse(client, job["id"], timeout=30)  # an ended job's stream replays and closes
        assert json.loads(frames[-1]["data"])["status"] == "cancelled"
        assert s3_keys(s3_server, job["output"]) == []

        assert client.delete(f"/v1/merges/{job['id']}").status_code == 204
        assert_problem(client.get(f"/v1/merges/{job['id']}"), 404, "not_found")


def test_cancel_running_job_stops_the_merge_and_leaves_nothing(service, slow_family, s3_server):
    with service.client() as client:
        job = submit(client, slow_spec(slow_family))
        job_id = job["id"]
        assert job["output"] == f"s3://mergeforge/artifacts/tenant-a/{job_id}"

        def in_engine():
            current = client.get(f"/v1/merges/{job_id}").json()
            assert current["status"] in ("queued", "running"), (current, service.logs())
            return current if current["status"] == "running" and current["stage"] in ENGINE_STAGES else None

        running = wait_until(in_engine, JOB_TIMEOUT, f"job {job_id} merging", interval=0.1)
        assert running["started_at"] is not None and running["attempts"] == 1
        assert_problem(client.delete(f"/v1/merges/{job_id}"), 409, "conflict")  # running: cancel first

        answer = client.post(f"/v1/merges/{job_id}/cancel")
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "cancelling", answer.json()

        seen: list[str] = []

        def ended():
            current = client.get(f"/v1/merges/{job_id}").json()
            seen.append(current["status"])
            return current if current["status"] in TERMINAL else None

        done = wait_until(ended, JOB_TIMEOUT, f"job {job_id} cancelled", interval=0.1)
        assert done["status"] == "cancelled", (done, service.logs())
        assert set(seen) <= {"cancelling", "cancelled"}, seen
        assert done["artifacts"] == [] and done["error"] is None and done["finished_at"] is not None
        assert_problem(client.get(f"/v1/merges/{job_id}/artifacts"), 409, "conflict")
        assert_problem(client.get(f"/v1/merges/{job_id}/artifacts/model.safetensors"), 404, "not_found")
        assert_problem(client.post(f"/v1/merges/{job_id}/cancel"), 409, "conflict")
        statuses = [e["status"] for e in all_events(client, job_id) if e["status"]]
        assert statuses == ["queued", "running", "cancelling", "cancelled"], statuses
        assert s3_keys(s3_server, done["output"]) == []
        # The worker's scratch folder goes right after the status is written.
        wait_until(lambda: not [p for p in (service.root / "work" / job_id).rglob("*") if p.is_file()], 30,
                   f"the work folder of {job_id} emptied")

        assert client.delete(f"/v1/merges/{job_id}").status_code == 204  # ended now
        assert_problem(client.get(f"/v1/merges/{job_id}"), 404, "not_found")


# ------------------------------------------------------------------------------------------ 3. idempotency
def test_idempotency_key_replays_the_job_and_refuses_another_body(idle_service, stored_family):
    key = f"idem-{uuid.uuid4().hex}"
    body = tiny_spec(stored_family, metadata={"run": "1"})
    with idle_service.client() as client, idle_service.client("tenant-b") as other:
        depth_before = metric(scrape(client), "mergeforge_queue_depth", queue="cpu")
        first = submit(client, body, key)
        again = submit(client, body, key)
        assert again["id"] == first["id"] and again["created_at"] == first["created_at"]
        reordered = submit(client, dict(reversed(list(body.items()))), key)  # the same JSON object
        assert reordered["id"] == first["id"]

        reused = client.post("/v1/merges", json=tiny_spec(stored_family, metadata={"run": "2"}),
                             headers={"Idempotency-Key": key})
        assert_problem(reused, 422, "idempotency_key_reused")

        fresh = submit(client, body, f"idem-{uuid.uuid4().hex}")
        assert fresh["id"] != first["id"]
        theirs = submit(other, body, key)  # keys are per tenant
        assert theirs["id"] not in (first["id"], fresh["id"])
        assert_problem(other.get(f"/v1/merges/{first['id']}"), 404, "not_found")

        # The replays were answered from the record: three jobs, three messages.
        assert metric(scrape(client), "mergeforge_queue_depth", queue="cpu") == depth_before + 3
        ids = [j["id"] for j in client.get("/v1/merges", params={"limit": 200}).json()["items"]]
        assert ids.count(first["id"]) == 1 and fresh["id"] in ids and theirs["id"] not in ids


def test_concurrent_requests_with_one_idempotency_key_make_one_job(idle_service, stored_family):
    """Rounds of 8 simultaneous identical requests (released together by a barrier), one key per round."""
    rounds, width = 20, 8
    keys = [f"race-{uuid.uuid4().hex}" for _ in range(rounds)]
    body = tiny_spec(stored_family, metadata={"run": "race"})
    barrier = threading.Barrier(width)

    def post_all(slot: int) -> list[str]:
        ids = []
        with idle_service.client() as own:
            own.get("/healthz")  # connect before the first round
            for key in keys:
                barrier.wait(timeout=60)
                response = own.post("/v1/merges", json=body, headers={"Idempotency-Key": key})
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])
        return ids

    with idle_service.client() as client:
        depth_before = metric(scrape(client), "mergeforge_queue_depth", queue="cpu")
        with ThreadPoolExecutor(width) as pool:
            per_slot = list(pool.map(post_all, range(width)))
        by_key = [{ids[r] for ids in per_slot} for r in range(rounds)]
        assert all(len(found) == 1 for found in by_key), [sorted(f) for f in by_key if len(f) > 1]
        made = {i for found in by_key for i in found}
        assert metric(scrape(client), "mergeforge_queue_depth", queue="cpu") == depth_before + rounds
        listed = [j["id"] for j in client.get("/v1/merges", params={"limit": 200}).json()["items"]]
        assert sorted(i for i in listed if i in made) == sorted(made)


def test_a_tenant_at_its_active_job_limit_is_refused_until_one_ends(tmp_path, s3_server, stored_family):
    """Two queued jobs at most (no worker runs them): a third is 429 with Retry-After, a retry of an accepted
    request still answers with its job, another tenant is not counted, and a cancelled job frees its slot."""
    env = {"MERGEFORGE_MAX_ACTIVE_JOBS": "2"}
    with running_service(tmp_path / "quota", s3_server, worker=False, extra_env=env) as svc, \
            svc.client() as client, svc.client("tenant-b") as other:
        first = submit(client, tiny_spec(stored_family), key="quota-1")
        submit(client, tiny_spec(stored_family))
        refused = client.post("/v1/merges", json=tiny_spec(stored_family))
        body = assert_problem(refused, 429, "too_many_jobs")
        assert refused.headers["retry-after"] == "30" and "2 jobs queued or running" in body["detail"]
        assert submit(client, tiny_spec(stored_family), key="quota-1")["id"] == first["id"]
        submit(other, tiny_spec(stored_family))
        assert client.post(f"/v1/merges/{first['id']}/cancel").json()["status"] == "cancelled"
        submit(client, tiny_spec(stored_family))
        assert_problem(client.post("/v1/merges", json=tiny_spec(stored_family)), 429, "too_many_jobs")


def test_a_tenant_over_its_request_rate_gets_429(tmp_path, s3_server):
    env = {"MERGEFORGE_RATE_LIMIT_PER_MINUTE": "5"}
    with running_service(tmp_path / "rate", s3_server, worker=False, extra_env=env) as svc, \
            svc.client() as client, svc.client("tenant-b") as other:
        if time.time() % 60 > 45:  # the count is per clock minute: start early in one
            time.sleep(61 - time.time() % 60)
        assert [client.get("/v1/merges").status_code for _ in range(5)] == [200] * 5
        limited = client.get("/v1/merges")
        body = assert_problem(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["retry-after"]) <= 60 and "more than 5 requests" in body["detail"]
        assert other.get("/v1/merges").status_code == 200  # another tenant has its own budget
        assert httpx.get(f"{svc.url}/healthz", timeout=30).status_code == 200  # probes are not counted


# -------------------------------------------------------------------------------------- 4. tenant isolation
def test_other_tenant_gets_404_for_every_job_route(service, streamed_job):
    job_id = streamed_job["job"]["id"]
    with service.client("tenant-b") as other, service.client() as owner:
        calls = [("GET", f"/v1/merges/{job_id}"), ("POST", f"/v1/merges/{job_id}/cancel"),
                 ("DELETE", f"/v1/merges/{job_id}"), ("GET", f"/v1/merges/{job_id}/events"),
                 ("GET", f"/v1/merges/{job_id}/events/stream"), ("GET", f"/v1/merges/{job_id}/artifacts"),
                 ("GET", f"/v1/merges/{job_id}/artifacts/merge_manifest.json")]
        for method, url in calls:
            theirs = assert_problem(other.request(method, url), 404, "not_found")
            missing = assert_problem(owner.request(method, url.replace(job_id, "mrg_0000000000000000zz")),
                                     404, "not_found")
            assert theirs["title"] == missing["title"], (method, url)
        listed = other.get("/v1/merges", params={"limit": 200}).json()["items"]
        assert job_id not in {j["id"] for j in listed}
        # Nothing tenant-b sent changed the job.
        assert owner.get(f"/v1/merges/{job_id}").json()["status"] == "succeeded"
        assert owner.get(f"/v1/merges/{job_id}/artifacts").status_code == 200
        assert job_id in {j["id"] for j in owner.get("/v1/merges", params={"limit": 200}).json()["items"]}


def test_other_tenant_cannot_cancel_or_delete_a_queued_job(idle_service, stored_family):
    with idle_service.client() as owner, idle_service.client("tenant-b") as other:
        job = submit(owner, tiny_spec(stored_family))
        assert_problem(other.post(f"/v1/merges/{job['id']}/cancel"), 404, "not_found")
        assert_problem(other.delete(f"/v1/merges/{job['id']}"), 404, "not_found")
        assert owner.get(f"/v1/merges/{job['id']}").json()["status"] == "queued"


def test_requests_without_a_valid_key_are_refused(service, stored_family):
    with client_for(service, None) as anonymous, client_for(service, "not-a-key") as wrong, \
            httpx.Client(base_url=service.url, headers={"Authorization": f"Basic {KEYS['tenant-a']}"}) as basic:
        for client in (anonymous, wrong, basic):
            for method, url, kwargs in [("GET", "/v1/merges", {}), ("GET", "/v1/merges/mrg_x", {}),
                                        ("POST", "/v1/merges", {"json": tiny_spec(stored_family)})]:
                response = client.request(method, url, **kwargs)
                assert_problem(response, 401, "unauthorized")
                assert response.headers["www-authenticate"].lower().startswith("bearer")


# ------------------------------------------------------------------------------------------------ 5. listing
def test_listing_is_newest_first_with_cursor_pages_and_status_filter(idle_service, stored_family):
    with client_for(idle_service, LISTER[1]) as client:
        created = [submit(client, tiny_spec(stored_family, metadata={"n": str(i)}))["id"] for i in range(7)]
        cancelled = set(created[::3])  # 3 of 7: the 1st, 4th and 7th
        for job_id in cancelled:
            assert client.post(f"/v1/merges/{job_id}/cancel").json()["status"] == "cancelled"

        full = client.get("/v1/merges", params={"limit": 200}).json()
        assert full["next"] is None
        assert [j["id"] for j in full["items"]] == created[::-1]
        stamps = [j["created_at"] for j in full["items"]]
        assert stamps == sorted(stamps, reverse=True)
        assert client.get("/v1/merges").json()["items"] == full["items"]  # default limit covers them

        for limit, sizes in [(3, [3, 3, 1]), (7, [7, 0]), (1, [1] * 7 + [0]), (200, [7])]:
            got = list_pages(client, limit)
            assert [len(p) for p in got] == sizes, (limit, got)
            flat = [i for p in got for i in p]
            assert flat == created[::-1] and len(set(flat)) == len(flat)

        by_status = list_pages(client, 2, status="cancelled")
        assert [len(p) for p in by_status] == [2, 1]
        assert [i for p in by_status for i in p] == [i for i in created[::-1] if i in cancelled]
        queued = [i for p in list_pages(client, 3, status="queued") for i in p]
        assert queued == [i for i in created[::-1] if i not in cancelled]
        assert list_pages(client, 5, status="succeeded") == [[]]
        # `after` is an exclusive cursor: the page after the 3rd newest starts with the 4th.
        tail = client.get("/v1/merges", params={"after": created[4], "limit": 200}).json()["items"]
        assert [j["id"] for j in tail] == created[3::-1]

        assert_problem(client.get("/v1/merges", params={"status": "sleeping"}), 422, "invalid_parameters")
        assert_problem(client.get("/v1/merges", params={"limit": 0}), 422, "invalid_parameters")
        assert_problem(client.get("/v1/merges", params={"limit": 201}), 422, "invalid_parameters")


def test_status_filter_finds_jobs_behind_many_others(idle_service, stored_family):
    """The filter reads past more non-matching jobs than one store batch holds (50)."""
    with client_for(idle_service, DEEP_LISTER[1]) as client:
        oldest = submit(client, tiny_spec(stored_family, metadata={"n": "oldest"}))["id"]
        assert client.post(f"/v1/merges/{oldest}/cancel").json()["status"] == "cancelled"
        newer = [submit(client, tiny_spec(stored_family, metadata={"n": str(i)}))["id"] for i in range(60)]

        assert list_pages(client, 1, status="cancelled") == [[oldest], []]
        assert list_pages(client, 10, status="cancelled") == [[oldest]]
        queued = list_pages(client, 25, status="queued")
        assert [len(p) for p in queued] == [25, 25, 10]
        assert [i for p in queued for i in p] == newer[::-1]
        everything = list_pages(client, 50)
        assert [len(p) for p in everything] == [50, 11]
        assert [i for p in everything for i in p] == [*newer[::-1], oldest]
        first = client.get("/v1/merges").json()  # the default page size is 50
        assert len(first["items"]) == 50 and first["next"] == newer[10]


# ------------------------------------------------------------------------------------------------- 6. events
def test_events_are_paged_with_after_and_limit(service, streamed_job):
    job_id = streamed_job["job"]["id"]
    with service.client() as client:
        events = all_events(client, job_id)
        assert events[0]["stage"] == "queued" and events[0]["status"] == "queued"
        assert events[-1]["status"] == "succeeded"
        assert [e["status"] for e in events if e["status"]] == ["queued", "running", "succeeded"]
        ids = [e["id"] for e in events]
        assert [stream_id(i) for i in ids] == sorted({stream_id(i) for i in ids})  # increasing, no repeats
        assert {"fetch", "merge"} <= {e["stage"] for e in events}
        assert len(events) >= 4

        paged, after, pages = [], None, 0
        while True:
            params = {"limit": 2, **({"after": after} if after else {})}
            page = client.get(f"/v1/merges/{job_id}/events", params=params).json()
            pages += 1
            assert len(page["items"]) <= 2
            paged += page["items"]
            if page["next"] is None:
                break
            assert page["next"] == page["items"][-1]["id"]
            after = page["next"]
        assert paged == events and pages in (len(events) // 2 + 1, (len(events) + 1) // 2)

        middle = events[len(events) // 2]["id"]
        later = client.get(f"/v1/merges/{job_id}/events", params={"after": middle}).json()["items"]
        assert later == events[len(events) // 2 + 1:]
        last = client.get(f"/v1/merges/{job_id}/events", params={"after": ids[-1]}).json()
        assert last == {"items": [], "next": None}
        assert_problem(client.get(f"/v1/merges/{job_id}/events", params={"after": "yesterday"}), 422,
                       "invalid_parameters")
        assert_problem(client.get(f"/v1/merges/{job_id}/events", params={"limit": 0}), 422, "invalid_parameters")


def test_event_stream_follows_the_job_to_its_end_and_resumes(service, streamed_job):
    job_id = streamed_job["job"]["id"]
    assert streamed_job["content_type"].startswith("text/event-stream")
    frames = streamed_job["frames"]
    assert frames, "no frames"
    for frame in frames:
        assert set(frame) == {"id", "event", "data"}, frame
        assert frame["event"] == "progress"
        assert json.loads(frame["data"])["id"] == frame["id"]
    data = [json.loads(f["data"]) for f in frames]
    assert data[0]["stage"] == "queued"
    assert data[-1]["status"] == "succeeded"  # the stream ends with the terminal status event
    assert [d["status"] for d in data if d["status"] in TERMINAL] == ["succeeded"]
    with service.client() as client:
        events = all_events(client, job_id)
        assert [f["id"] for f in frames] == [e["id"] for e in events]  # live, it missed nothing

        cut = len(frames) // 2
        content_type, resumed = read_sse(client, job_id, last_event_id=frames[cut]["id"], timeout=30)
        assert content_type.startswith("text/event-stream")
        assert [f["id"] for f in resumed] == [f["id"] for f in frames[cut + 1:]]
        assert json.loads(resumed[-1]["data"])["status"] == "succeeded"
        _, nothing = read_sse(client, job_id, last_event_id=frames[-1]["id"], timeout=30)
        assert nothing == []
        response = client.get(f"/v1/merges/{job_id}/events/stream", headers={"Last-Event-ID": "not-an-id"})
        assert_problem(response, 422, "invalid_parameters")


def test_event_stream_keeps_the_terminal_event_of_a_job_ending_during_replay(idle_service, stored_family):
    """The interleaving made deterministic, in process against the idle service's Redis: the job is cancelled right
    after the stream has read the stored events and before it reads the job record. Through HTTP alone it is a race:
    streams opened over and over while small jobs ran closed without the terminal event 13 times in 566."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.core.eventfeed import EventFeed
    from app.core.jobstore import JobStore
    from app.main import create_app

    with idle_service.client() as client:
        job = submit(client, tiny_spec(stored_family))
    settings = Settings(redis_url=idle_service.redis.url, storage_url="s3://mergeforge/artifacts",
                        s3_endpoint_url=idle_service.s3.endpoint, api_keys={hash_key(KEYS["tenant-a"]): "tenant-a"})
    app = create_app(settings)
    store = JobStore.from_url(settings.redis_url)
    replays = []

    class EndsDuringReplay(EventFeed):
        async def events(self, job_id, after, limit):
            found = await super().events(job_id, after, limit)
            if not replays:
                replays.append(found)
                assert store.request_cancel(job_id).status == "cancelled"  # the job ends now
            return found

    app.state.services.__dict__["feed"] = EndsDuringReplay.from_url(settings.redis_url)
    with TestClient(app) as client:
        response = client.get(f"/v1/merges/{job['id']}/events/stream",
                              headers={"Authorization": f"Bearer {KEYS['tenant-a']}"})
    assert response.status_code == 200 and replays, response.text
    data = [json.loads(line.removeprefix("data: ")) for line in response.text.splitlines() if line.startswith("data:")]
    with idle_service.client() as client:
        assert [e["status"] for e in all_events(client, job["id"]) if e["status"]] == ["queued", "cancelled"]
    assert data and data[-1]["status"] == "cancelled", data


def test_open_event_streams_do_not_hold_the_servers_threads(idle_service, stored_family):
    """More streams waiting on a queued job than the server has worker threads (40): every one gets its first
    event at once and the sync routes still answer, because a stream awaits Redis instead of holding a thread
    (streams that held threads left the last 20 without their first event until a 15 s wait had ended)."""
    with idle_service.client() as client:
        job = submit(client, tiny_spec(stored_family))
    opened, release = threading.Barrier(61), threading.Event()

    def follow() -> None:
        with idle_service.client() as client, client.stream("GET", f"/v1/merges/{job['id']}/events/stream") as s:
            assert s.status_code == 200
            next(s.iter_lines())  # the replayed `queued` event: the stream is now waiting
            opened.wait(timeout=60)
            release.wait(timeout=60)

    with ThreadPoolExecutor(60) as pool:
        streams = [pool.submit(follow) for _ in range(60)]
        try:
            opened.wait(timeout=10)
            with idle_service.client() as client:
                client.timeout = httpx.Timeout(10)
                assert client.get(f"/v1/merges/{job['id']}").json()["status"] == "queued"
                assert client.post(f"/v1/merges/{job['id']}/cancel").json()["status"] == "cancelled"
        finally:
            release.set()
        for stream in streams:
            stream.result()


# ------------------------------------------------------------------------------------------------- 7. delete
def test_delete_ended_job_removes_record_and_artifacts(service, stored_family, s3_server):
    with service.client() as client:
        job = submit(client, tiny_spec(stored_family, metadata={"test": "delete"}))
        done = wait_for_job(client, job["id"], TERMINAL, timeout=JOB_TIMEOUT)
        assert done["status"] == "succeeded", (done["error"], service.logs())
        stored = s3_keys(s3_server, done["output"])
        assert any(k.endswith("/merge_manifest.json") for k in stored), stored
        assert {a["uri"].removeprefix("s3://mergeforge/") for a in done["artifacts"]} <= set(stored)

        response = client.delete(f"/v1/merges/{job['id']}")
        assert response.status_code == 204 and response.content == b""
        assert s3_keys(s3_server, done["output"]) == []
        for url in (f"/v1/merges/{job['id']}", f"/v1/merges/{job['id']}/events",
                    f"/v1/merges/{job['id']}/artifacts"):
            assert_problem(client.get(url), 404, "not_found")
        assert_problem(client.delete(f"/v1/merges/{job['id']}"), 404, "not_found")
        assert job["id"] not in {j["id"] for j in client.get("/v1/merges", params={"limit": 200}).json()["items"]}


# ------------------------------------------------------------------------------------------ 8. health, metrics
def test_health_readiness_and_metrics(service, streamed_job):
    assert httpx.get(f"{service.url}/healthz", timeout=30).status_code == 200
    ready = httpx.get(f"{service.url}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"redis": True, "storage": True, "workers": True}
    with service.client() as client:
        response = client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        table = samples(response.text)
    assert metric(table, "mergeforge_jobs", status="succeeded") >= 1
    assert ("mergeforge_queue_depth", frozenset({("queue", "cpu")})) in table
    assert metric(table, "mergeforge_queue_workers", queue="cpu") == 1  # the one test worker, consuming cpu,gpu
    assert metric(table, "mergeforge_queue_workers", queue="gpu") == 1
    assert any(name == "mergeforge_http_requests_total" and value >= 1 for (name, _), value in table.items())
    assert metric(table, "mergeforge_job_duration_seconds_bucket", status="succeeded", le="+Inf") >= 1
    assert metric(table, "mergeforge_job_duration_seconds_count", status="succeeded") >= 1


def test_readiness_fails_without_a_worker(idle_service):
    assert httpx.get(f"{idle_service.url}/healthz", timeout=30).status_code == 200
    body = assert_problem(httpx.get(f"{idle_service.url}/readyz", timeout=30), 503, "not_ready")
    assert body["checks"] == {"redis": True, "storage": True, "workers": False}
    with idle_service.client() as client:
        table = scrape(client)
    assert ("mergeforge_queue_workers", frozenset({("queue", "gpu")})) in table
    assert metric(table, "mergeforge_queue_workers", queue="gpu") == 0


def test_a_worker_counts_while_its_heartbeat_lasts(idle_service):
    """What a worker's housekeeping thread writes, with a short lifetime: ready while it lasts, per queue, then gone."""
    from app.core.jobstore import JobStore

    store = JobStore.from_url(idle_service.redis.url)
    store.heartbeat("gpu-host:1", {"queues": ["gpu"]}, ttl_s=2)
    with idle_service.client() as client:
        assert httpx.get(f"{idle_service.url}/readyz", timeout=30).status_code == 200
        table = scrape(client)
        assert metric(table, "mergeforge_queue_workers", queue="gpu") == 1
        assert metric(table, "mergeforge_queue_workers", queue="cpu") == 0
        wait_until(lambda: httpx.get(f"{idle_service.url}/readyz", timeout=30).status_code == 503, 10,
                   "the heartbeat to expire")
        assert metric(scrape(client), "mergeforge_queue_workers", queue="gpu") == 0
    assert store.r.zcard("mf:workers") == 0


def test_metrics_follow_job_counts_and_queue_depth(idle_service, stored_family):
    with idle_service.client() as client:
        before = scrape(client)
        job = submit(client, tiny_spec(stored_family))
        after_submit = scrape(client)
        for status, change in [("queued", 1), ("cancelled", 0), ("running", 0)]:
            assert metric(after_submit, "mergeforge_jobs", status=status) == \
                metric(before, "mergeforge_jobs", status=status) + change, status
        assert metric(after_submit, "mergeforge_queue_depth", queue="cpu") == \
            metric(before, "mergeforge_queue_depth", queue="cpu") + 1
        posts = ("mergeforge_http_requests_total", {"method": "POST", "route": "/v1/merges", "status": "202"})
        assert metric(after_submit, posts[0], **posts[1]) == metric(before, posts[0], **posts[1]) + 1

        assert client.post(f"/v1/merges/{job['id']}/cancel").status_code == 200
        after_cancel = scrape(client)
        assert metric(after_cancel, "mergeforge_jobs", status="queued") == metric(before, "mergeforge_jobs",
                                                                                  status="queued")
        assert metric(after_cancel, "mergeforge_jobs", status="cancelled") == \
            metric(before, "mergeforge_jobs", status="cancelled") + 1

        assert client.delete(f"/v1/merges/{job['id']}").status_code == 204
        after_delete = scrape(client)
        assert metric(after_delete, "mergeforge_jobs", status="cancelled") == \
            metric(before, "mergeforge_jobs", status="cancelled")


# -------------------------------------------------------------------------------------------- 9. problems
def test_every_error_is_problem_json(idle_service, stored_family):
    with idle_service.client() as client, client_for(idle_service, None) as anonymous:
        job = submit(client, tiny_spec(stored_family))
        cases = [
            (anonymous.get("/v1/merges"), 401, "unauthorized"),
            (client.get("/v1/merges/mrg_nosuchjob"), 404, "not_found"),
            (client.get("/v1/no-such-route"), 404, "not_found"),
            (client.put("/v1/merges", json={}), 405, "method_not_allowed"),
            (client.post("/v1/merges", json={"base_model": stored_family["base"]}), 422, "invalid_parameters"),
            (client.post("/v1/merges", content=b"{not json", headers={"Content-Type": "application/json"}), 422,
             "invalid_parameters"),
            (client.post("/v1/merges", json=tiny_spec(stored_family, base_model="http://example.com/m")), 422,
             "invalid_parameters"),
            (client.post("/v1/merges", json=tiny_spec(stored_family, method="no-such-method")), 422, None),
            (client.get("/v1/merges", params={"limit": "many"}), 422, "invalid_parameters"),
            (client.get(f"/v1/merges/{job['id']}/artifacts"), 409, "conflict"),
            (client.get(f"/v1/merges/{job['id']}/artifacts/model.safetensors"), 404, "not_found"),
            (client.delete(f"/v1/merges/{job['id']}"), 409, "conflict"),
            (client.get(f"/v1/merges/{job['id']}/events", params={"after": "x"}), 422, "invalid_parameters"),
            (client.get(f"/v1/merges/{job['id']}/events/stream", headers={"Last-Event-ID": "x"}), 422,
             "invalid_parameters"),
            (client.post("/v1/merges", json=tiny_spec(stored_family), headers={"Idempotency-Key": "k" * 201}), 422,
             "invalid_parameters"),
            (client.post("/v1/merges", content=json.dumps(tiny_spec(stored_family)),
                         headers={"Content-Type": "text/plain"}), 422, "invalid_parameters"),
        ]
        for response, status, code in cases:
            body = assert_problem(response, status, code)
            assert body["instance"] == response.request.url.path, body



def test_oversized_body_is_refused(service):
    with service.client() as client:
        response = client.post("/v1/merges", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "payload_too_large"
