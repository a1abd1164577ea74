"""A TIES merge of a small Hugging Face model stored in S3, end to end through the HTTP API and a real worker."""

from __future__ import annotations

import hashlib
import io
import json

import httpx
import torch
from safetensors.torch import load
from servers import wait_for_job


def _spec(uris: dict[str, str], method: str = "ties", **extra) -> dict:
    return {"method": method, "base_model": uris["base"],
            "models": [{"model": uris[f"task{i}"], "name": f"task{i}"} for i in range(3)],
            "parameters": {"density": 0.5} if method == "ties" else {}, **extra}


def test_ties_merge_from_s3_end_to_end(service, stored_family, tmp_path):
    with service.client() as client:
        created = client.post("/v1/merges", json=_spec(stored_family, metadata={"run": "e2e"}))
        assert created.status_code == 202, created.text
        job = created.json()
        assert created.headers["location"] == f"/v1/merges/{job['id']}"
        assert job["status"] in ("queued", "running") and job["metadata"] == {"run": "e2e"}
        done = wait_for_job(client, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", (done["error"], service.logs())
        assert done["progress"] == 1.0 and done["attempts"] == 1
        artifacts = client.get(f"/v1/merges/{job['id']}/artifacts").json()
        files = {f["path"]: f for f in artifacts["files"]}
        assert {"model.safetensors", "config.json", "README.md", "merge_manifest.json",
                "heads/task0.safetensors"} <= set(files)
        manifest = artifacts["manifest"]
        assert manifest["spec"]["method"] == "ties"
        by_path = {o["path"]: o for o in manifest["outputs"]}
        for path, f in files.items():
            body = httpx.get(f["url"], timeout=30).content  # presigned: no credentials
            assert hashlib.sha256(body).hexdigest() == f["sha256"], path
            if path in by_path:
                assert by_path[path]["sha256"] == f["sha256"]
        merged = load(httpx.get(files["model.safetensors"]["url"]).content)
        assert merged and all(t.dtype == torch.float32 for t in merged.values())
        events = client.get(f"/v1/merges/{job['id']}/events").json()["items"]
        stages = [e["stage"] for e in events]
        assert stages[0] == "queued" and "fetch" in stages and "merge" in stages and stages[-1] == "succeeded"
        fractions = [e["fraction"] for e in events]
        assert fractions == sorted(fractions)
        config = json.loads(httpx.get(files["config.json"]["url"]).content)
        assert config["model_type"] == "bert"
        head = load(io.BytesIO(httpx.get(files["heads/task1.safetensors"]["url"]).content).read())
        assert set(head) == {"classifier.weight", "classifier.bias"}
