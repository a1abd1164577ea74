"""Real servers for the service tests, on free loopback ports: Valkey (Redis), SeaweedFS (S3), a Celery worker
and the API under uvicorn, each its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx

from app.core.config import hash_key
from app.core.redis_server import RedisServer, free_port

S3_KEY, S3_SECRET, BUCKET = "mergeforge-test", "mergeforge-test-secret", "mergeforge"
KEYS = {"tenant-a": "key-a-0123456789", "tenant-b": "key-b-0123456789"}
ROOT = Path(__file__).resolve().parent.parent


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready within {timeout} s ({last})")


class SeaweedS3:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def start(self) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        names = ["master", "volume", "filer", "admin"]
        ports = {f"-{n}.port": free_port() for n in names} | {f"-{n}.port.grpc": free_port() for n in names}
        args = ["weed", "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
                "-webdav=false", f"-bucket={BUCKET}", f"-s3.port={self.port}", f"-s3.port.grpc={free_port()}",
                *(f"{k}={v}" for k, v in ports.items())]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        log = (self.data_dir / "weed.log").open("wb")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        client = self.client()
        wait_until(lambda: any(b["Name"] == BUCKET for b in client.list_buckets()["Buckets"]), 60, "SeaweedFS S3")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def upload_folder(self, folder: Path, prefix: str) -> str:
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{BUCKET}/{prefix}"


@dataclass
class Service:
    """The API and one Celery worker against a Redis and an S3 server."""

    root: Path
    redis: RedisServer
    s3: SeaweedS3
    extra_env: dict[str, str] = field(default_factory=dict)
    api_port: int = field(default_factory=free_port)
    worker: subprocess.Popen | None = None
    api: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MERGEFORGE_REDIS_URL": self.redis.url,
            "MERGEFORGE_STORAGE_URL": f"s3://{BUCKET}/artifacts",
            "MERGEFORGE_S3_ENDPOINT_URL": self.s3.endpoint,
            "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "MERGEFORGE_API_KEYS": json.dumps({hash_key(k): t for t, k in KEYS.items()}),
            "MERGEFORGE_FILE_ROOTS": json.dumps([str(self.root)]),
            "MERGEFORGE_CACHE_DIR": str(self.root / "cache"),
            "MERGEFORGE_WORK_DIR": str(self.root / "work"),
            "MERGEFORGE_LEASE_S": "6",
            "MERGEFORGE_VISIBILITY_TIMEOUT_S": "120",
            "MERGEFORGE_WEBHOOK_ALLOW_PRIVATE": "true",  # the tests' receivers listen on loopback
            **self.extra_env,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_worker(self, name: str = "w1") -> subprocess.Popen:
        log = (self.root / f"worker-{name}.log").open("ab")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker", "-Q", "cpu,gpu",
             "--concurrency", "1", "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "info"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.worker

    def start_api(self) -> subprocess.Popen:
        log = (self.root / "api.log").open("ab")
        self.api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
             "--port", str(self.api_port), "--log-level", "warning"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.api

    def start(self) -> Service:
        self.root.mkdir(parents=True, exist_ok=True)
        self.start_worker()
        self.start_api()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        wait_until(lambda: httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200, timeout, "the service")

    def kill_worker(self) -> None:
        """SIGKILL the worker and its pool processes: nothing runs its shutdown code."""
        if self.worker and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()

    def stop(self) -> None:
        for proc in (self.api, self.worker):
            if proc and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def client(self, tenant: str = "tenant-a") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=30)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.root.glob("*.log")))


@contextmanager
def running_service(root: Path, s3: SeaweedS3, *, worker: bool = True,
                    extra_env: dict[str, str] | None = None) -> Iterator[Service]:
    """Redis, the API and (unless `worker` is false) one Celery worker of their own; stopped on exit."""
    root.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(root / "redis").start()
    svc = Service(root, redis, s3, extra_env=extra_env or {})
    try:
        try:
            if worker:
                svc.start()
            else:
                svc.start_api()
                wait_until(lambda: httpx.get(f"{svc.url}/healthz", timeout=2).status_code == 200, 90, "the API")
        except Exception:
            raise RuntimeError(svc.logs()) from None
        yield svc
    finally:
        svc.stop()
        redis.stop()


def wait_for_job(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 120) -> dict:
    def check():
        job = client.get(f"/v1/merges/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(check, timeout, f"job {job_id} in {statuses}", interval=0.2)
