"""`mergeforge serve`, the embedded default, as a user starts it: one command, then HTTP, then Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
from servers import wait_until

from app.core.redis_server import free_port


def test_serve_merges_from_files_and_stops_everything(tmp_path, bert_family):
    port = free_port()
    data = tmp_path / "data"
    log = (tmp_path / "serve.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGEFORGE_")}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir", str(data)],
                            cwd=bert_family.base.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 120, "mergeforge serve")
        spec = {"method": "task_arithmetic", "base_model": bert_family.base.as_uri(),
                "models": [{"model": t.as_uri()} for t in bert_family.tasks]}
        created = httpx.post(f"{url}/v1/merges", json=spec, timeout=30)  # no key: loopback, anonymous
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        job = wait_until(lambda: (j := httpx.get(f"{url}/v1/merges/{job_id}").json())["status"] in
                         ("succeeded", "failed") and j, 120, "the merge")
        assert job["status"] == "succeeded", job["error"]
        assert job["output"].startswith((data / "storage").as_uri())
        files = {f["path"]: f for f in httpx.get(f"{url}/v1/merges/{job_id}/artifacts").json()["files"]}
        card = httpx.get(url + files["README.md"]["url"])  # file storage: the API serves the file itself
        assert card.status_code == 200 and "mergeforge" in card.text
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "serve started no worker or Redis process"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert f"MergeForge {url}" in output and "anyone on this machine" in output, output
    deadline = time.monotonic() + 30
    while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children):
        assert time.monotonic() < deadline, f"still running after Ctrl-C: {children}\n{output}"
        time.sleep(0.2)
