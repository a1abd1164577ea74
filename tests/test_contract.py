"""The HTTP contract: the committed OpenAPI document is current, and the running service keeps to it.

Schemathesis generates requests from `openapi/openapi.json` (the contract clients see) and sends them to the real
service (the `service` fixture: uvicorn, Redis, S3 and a worker), with a bounded, derandomized number of examples
per operation so the whole module stays fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from servers import KEYS, wait_until

ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT / "openapi" / "openapi.json"
TENANT = "tenant-b"  # the end-to-end tests use tenant-a; fuzzing never touches its jobs
AUTH = {"Authorization": f"Bearer {KEYS[TENANT]}"}
MAX_EXAMPLES = 25
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]


# ----------------------------------------------------------------------------------------- the committed file
def _load_exporter():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import export_openapi
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return export_openapi


def test_openapi_is_committed():
    exporter = _load_exporter()
    fresh = exporter.render()
    committed = OPENAPI.read_text(encoding="utf-8") if OPENAPI.exists() else ""
    if committed != fresh:
        old, new = (json.loads(committed).get("paths", {}) if committed else {}), json.loads(fresh)["paths"]
        changed = sorted(p for p in old.keys() | new.keys() if old.get(p) != new.get(p))
        pytest.fail("openapi/openapi.json differs from the app's schema: run python scripts/export_openapi.py "
                    f"(paths changed: {changed or 'components/info only'})", pytrace=False)


def test_importing_the_app_does_not_import_torch():
    code = "import sys, app.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "import app.main imported torch: the API image has no torch"


# --------------------------------------------------------------------------------------------- schemathesis
SCHEMA = schemathesis.openapi.from_path(OPENAPI)

# The read endpoints and the two creating ones. Not fuzzed: POST .../cancel and DELETE (they change jobs other
# than the ones generated here would see). The SSE stream and the artifact download are fuzzed only with ids of
# unknown jobs (404) and of `ended_job`: for a job that has not ended the stream never finishes (a keep-alive
# every 15 s), and a download of a succeeded job needs a real merge (too slow for a contract test).
OPERATIONS = [
    "GET /v1/merges",
    "GET /v1/merges/{job_id}",
    "GET /v1/merges/{job_id}/events",
    "GET /v1/merges/{job_id}/events/stream",
    "GET /v1/merges/{job_id}/artifacts",
    "GET /v1/merges/{job_id}/artifacts/{path}",
    "GET /v1/checkpoints",
    "GET /v1/checkpoints/{checkpoint_id}",
    "GET /v1/methods",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "POST /v1/merges",
    "POST /v1/checkpoints",
]


def _operation(label: str):
    method, path = label.split(" ", 1)
    return SCHEMA[path][method]


def _strategy(label: str, mode: GenerationMode, job_id: str):
    operation = _operation(label)
    strategies = [operation.as_strategy(generation_mode=mode)]
    if "{job_id}" in operation.path:
        strategies.append(operation.as_strategy(generation_mode=mode, path_parameters={"job_id": job_id}))
    return st.one_of(strategies)


def _run(service, label: str, mode: GenerationMode, job_id: str, checks) -> None:
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=_strategy(label, mode, job_id))
    def run(case):
        response = case.call(base_url=service.url, headers=AUTH, timeout=20)
        case.validate_response(response, checks=checks)

    run()


@pytest.fixture(scope="module")
def ended_job(service) -> str:
    """A job of this module's tenant that has ended (cancelled while queued, or failed: its inputs do not exist)."""
    with httpx.Client(base_url=service.url, headers=AUTH, timeout=30) as client:
        body = {"method": "ties", "base_model": "s3://mergeforge/contract/missing-base",
                "models": [{"model": "s3://mergeforge/contract/missing-task"}], "parameters": {"density": 0.5}}
        created = client.post("/v1/merges", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        client.post(f"/v1/merges/{job_id}/cancel")
        wait_until(lambda: client.get(f"/v1/merges/{job_id}").json()["status"] in {"cancelled", "failed"}, 60,
                   f"job {job_id} ended")
        yield job_id
        client.delete(f"/v1/merges/{job_id}")


# Negative data (values the schema forbids) only where the schema forbids something: a bare string path parameter
# has no invalid value, so e.g. GET /v1/merges/{job_id} has no negative cases.
NEGATIVE_OPERATIONS = [
    "GET /v1/merges",
    "GET /v1/merges/{job_id}/events",
    "GET /v1/merges/{job_id}/events/stream",
    "GET /v1/checkpoints",
    "POST /v1/merges",
    "POST /v1/checkpoints",
]
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in NEGATIVE_OPERATIONS]
IDS = [f"{label}-{mode.value}" for label, mode in CASES]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=IDS)
def test_no_server_errors(service, ended_job, label, mode):
    _run(service, label, mode, ended_job, [not_a_server_error])


@pytest.mark.parametrize(("label", "mode"), CASES, ids=IDS)
def test_responses_conform_to_the_schema(service, ended_job, label, mode):
    _run(service, label, mode, ended_job, CONFORMANCE)
