"""API load benchmark: many concurrent job creations against the MergeForge service, then every job to the end.

What it measures
----------------
* The stack: unless `--url` is given, the script starts its own on free loopback ports, each its own process:
  a private Redis (Valkey, `app.core.redis_server.RedisServer`), storage (a `file://` folder under a temp dir,
  or SeaweedFS S3 with `--s3`), `--workers` Celery workers (`--concurrency 1` each, queues cpu,gpu) and the API
  under uvicorn (one process), configured like `tests/servers.py` with one API key. It waits until the API is
  ready and every worker has sent its heartbeat.
* The inputs: a tiny checkpoint family (a base and 3 task models, 6 float32 tensors, ~13K parameters each,
  Hugging Face folder layout without config) written once beside the storage folder (or uploaded to S3), so
  each merge costs a few milliseconds of engine time and the numbers are about the service, not the engine.
* Creation: `--jobs` POST /v1/merges (a cheap `--method`, default `linear`), from `--clients` concurrent
  clients (asyncio + one httpx.AsyncClient, one connection per in-flight request), all started together.
  Each job has its own Idempotency-Key and its index in `metadata`. Half of the clients (the even-numbered
  ones) re-send every request they made with the same key and body, right after the first answer (or at the
  same time as the first, with `--replay concurrent`); the replay must name the same job id, else it counts
  as a duplicate. A request answered 429, 5xx or not at all is retried (same key, same body) up to
  `--retries` times; create latency is the client's time from the first send to the 202 (retries
  included), replay latency the same for the re-sent request.
* Completion: the script then pages through GET /v1/merges (200 a page, newest first, until the jobs older
  than this run) every `--poll-interval` seconds until all its jobs are in a terminal state or `--deadline`
  seconds have passed. Then it checks every job: GET /v1/merges/{id}, one more full listing, and the listings
  filtered by status (?status=succeeded, failed, cancelled).
* The table: create latency p50/p99/max (ms), replay latency p50, creations per second (unique jobs / the
  create phase's wall time), end-to-end jobs per second (terminal jobs / (last finished_at - first
  created_at), the server's own timestamps), a job's run time p50 (finished_at - started_at) and queue wait
  p50 (started_at - created_at), HTTP status counts, and the counts that must be zero:
  - lost: created (202) but not in a terminal state at the deadline, 404 on GET, missing from the full listing
    or from the listing of its status;
  - duplicated (idempotency keys or jobs affected): a replay that named another job id, a key with more than
    one job in the listing (jobs carry their key's index in metadata), a job of this run that no 202 named, or
    a job listed twice in one listing;
  - failed: jobs that ended failed or cancelled (their error codes are printed).
  With `--repeats R` the load runs R times on the same stack and the table shows each run and the median
  (counts: the sum). Quote medians. The load generator runs on the same machine as the service and
  competes with it for the same cores; the table prints the core count and the load average before and after.

How to run
----------
    python benchmarks/api_load.py                          # 500 jobs, 50 clients, 2 workers, file storage
    python benchmarks/api_load.py --jobs 200 --clients 20  # lighter, for a busy machine
    python benchmarks/api_load.py --s3 --workers 4 --repeats 3
    python benchmarks/api_load.py --replay concurrent      # first send and replay race each other
    python benchmarks/api_load.py --url http://127.0.0.1:8000 --api-key KEY \\
        --checkpoints file:///data/base file:///data/t0 file:///data/t1 file:///data/t2

With `--url`, the checkpoints must be readable by that service: pass their URIs (base first), or
`--family-dir DIR` for a folder the service may read (MERGEFORGE_FILE_ROOTS) to write the tiny family into.

This is a benchmark, not a test: it never asserts a target. It exits 1 when the service fails (a stack that
does not start, requests that fail after their retries, 5xx answers, failed jobs, a process that died) or
loses or duplicates jobs, with the failing requests, their answers and the logs' tails; 0 otherwise. Every
process it started is stopped on the way out, Ctrl-C and SIGTERM included; the temp dir (logs, data) is kept
when something went wrong or with `--keep`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
TENANT = "bench"
TERMINAL = ("succeeded", "failed", "cancelled")
PAGE = 200
RETRY_STATUSES = {429, 500, 502, 503, 504}
SAMPLES = 8  # problems printed per kind
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------- the stack
def _import_paths() -> None:
    for path in (str(TESTS_DIR), str(REPO_ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read: {exc})"
    return text[-chars:]


def asgi_app() -> list[str]:
    """uvicorn's app argument: the factory where app/main.py has one (settings read at start), else `app`."""
    source = (REPO_ROOT / "app" / "main.py").read_text()
    return ["--factory", "app.main:create_app"] if "def create_app(" in source else ["app.main:app"]


@dataclass
class Stack:
    """Redis, storage (a folder or SeaweedFS), N Celery workers and the API, each its own process group."""

    root: Path
    workers: int
    use_s3: bool
    api_key: str = field(default_factory=lambda: f"bench-{secrets.token_hex(16)}")
    redis: Any = None
    s3: Any = None
    api_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def storage_root(self) -> Path:
        return self.root / "storage"

    def start(self) -> Stack:
        _import_paths()
        from app.core.config import hash_key
        from app.core.redis_server import RedisServer, free_port

        self.storage_root.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.root / "redis")
        self.redis.start()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "MERGEFORGE_REDIS_URL": self.redis.url,
            "MERGEFORGE_STORAGE_URL": self.storage_root.as_uri(),
            "MERGEFORGE_API_KEYS": json.dumps({hash_key(self.api_key): TENANT}),
            "MERGEFORGE_ALLOW_ANONYMOUS": "false",
            "MERGEFORGE_FILE_ROOTS": json.dumps([str(self.root)]),
            "MERGEFORGE_CACHE_DIR": str(self.root / "cache"),
            "MERGEFORGE_WORK_DIR": str(self.root / "work"),
        }
        if self.use_s3:
            from servers import BUCKET, S3_KEY, S3_SECRET, SeaweedS3

            self.s3 = SeaweedS3(self.root / "s3")
            self.s3.start()
            env |= {"MERGEFORGE_STORAGE_URL": f"s3://{BUCKET}/artifacts",
                    "MERGEFORGE_S3_ENDPOINT_URL": self.s3.endpoint, "AWS_ACCESS_KEY_ID": S3_KEY,
                    "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
        self._env = env
        for i in range(1, self.workers + 1):
            self._spawn(f"worker-w{i}", [
                sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker", "-Q", "cpu,gpu",
                "--concurrency", "1", "-n", f"w{i}@%h", "--without-gossip", "--without-mingle", "--loglevel", "info"])
        self.api_port = free_port()
        self._spawn("api", [sys.executable, "-m", "uvicorn", *asgi_app(), "--host", "127.0.0.1", "--port",
                            str(self.api_port), "--log-level", "warning"])
        self._wait_ready()
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        with (self.root / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(args, cwd=REPO_ROOT, env=self._env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_ready(self, timeout: float = 180.0) -> None:
        from redis import Redis

        redis = Redis.from_url(self.redis.url, decode_responses=True)
        deadline = time.monotonic() + timeout
        last = ""
        try:
            while time.monotonic() < deadline:
                check_stop()
                dead = self.dead()
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} exited during start-up")
                try:
                    ready = httpx.get(f"{self.url}/readyz", timeout=2)
                    beats = len(list(redis.scan_iter("mf:worker:*", count=100)))
                    last = f"readyz {ready.status_code}, {beats}/{self.workers} worker heartbeats"
                    if ready.status_code == 200 and beats >= self.workers:
                        return
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.25)
        finally:
            redis.close()
        raise TimeoutError(f"the service was not ready within {timeout:.0f} s ({last})")

    def dead(self) -> list[str]:
        return [f"{name} (exit {p.returncode})" for name, p in self.procs.items() if p.poll() is not None]

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p} (last {chars} characters)\n{_tail(p, chars)}"
                         for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """SIGTERM each process group (the API first, so nothing new is queued), SIGKILL past 20 s."""
        for name in sorted(self.procs, key=lambda n: n != "api"):
            proc = self.procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.s3 is not None:
            self.s3.stop()
        if self.redis is not None:
            self.redis.stop()


def write_family(folder: Path, n_tasks: int = 3, seed: int = 0) -> list[Path]:
    """A base and `n_tasks` task models (base + small noise) as Hugging Face folders: [base, task0, ...]."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (128, 32), "model.layers.0.mlp.up.weight": (64, 32),
              "model.layers.0.mlp.up.bias": (64,), "model.layers.1.mlp.up.weight": (64, 32),
              "model.layers.1.mlp.up.bias": (64,), "model.norm.weight": (32,)}
    base = {name: (rng.standard_normal(shape) * 0.02).astype(np.float32) for name, shape in shapes.items()}
    folders = []
    for k in range(n_tasks + 1):
        tensors = base if k == 0 else {n: (t + rng.standard_normal(t.shape) * 0.002).astype(np.float32)
                                       for n, t in base.items()}
        out = folder / ("base" if k == 0 else f"task{k - 1}")
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        folders.append(out)
    return folders


# ---------------------------------------------------------------------------------------------------- the load
@dataclass
class Problem:
    what: str
    detail: str


@dataclass
class Send:
    job_id: str | None
    latency_s: float
    tries: int


@dataclass
class RunResult:
    run_id: str
    jobs: int
    create_latencies: list[float] = field(default_factory=list)
    replay_latencies: list[float] = field(default_factory=list)
    http_codes: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    problems: list[Problem] = field(default_factory=list)
    ids: dict[int, str] = field(default_factory=dict)  # job index -> the id its first send was answered
    create_wall_s: float = 0.0
    completion_wall_s: float = 0.0
    final: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> GET body
    lost: dict[str, str] = field(default_factory=dict)  # id -> why
    duplicated: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # key or job -> why
    answered: set[str] = field(default_factory=set)  # every job id a 202 named, replays included
    failed: dict[str, str] = field(default_factory=dict)  # id -> error code
    not_created: int = 0
    replays_failed: int = 0
    server_errors: int = 0

    def problem(self, what: str, detail: str) -> None:
        self.problems.append(Problem(what, detail))


def job_body(args: argparse.Namespace, uris: list[str], run_id: str, index: int) -> dict[str, Any]:
    parameters = {"lambda": 0.3} if args.method == "task_arithmetic" else {}
    return {"method": args.method, "base_model": uris[0],
            "models": [{"model": uri, "name": f"task{k}"} for k, uri in enumerate(uris[1:])],
            "parameters": parameters, "metadata": {"bench_run": run_id, "bench_job": str(index)}}


async def send_create(client: httpx.AsyncClient, body: dict[str, Any], key: str, retries: int,
                      result: RunResult, label: str) -> Send:
    """POST /v1/merges with retries on 429, 5xx and transport errors; the latency spans every try."""
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        if attempt:
            result.retries += 1
            await asyncio.sleep(min(2.0, 0.1 * 2 ** attempt))
        try:
            response = await client.post("/v1/merges", json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError as exc:
            result.http_codes[type(exc).__name__] += 1
            result.problem("transport error", f"{label} key={key} try {attempt + 1}: {type(exc).__name__}: {exc}")
            continue
        result.http_codes[str(response.status_code)] += 1
        if response.status_code == 202:
            job_id = response.json().get("id")
            result.answered.add(job_id)
            return Send(job_id, time.perf_counter() - t0, attempt + 1)
        result.problem(f"HTTP {response.status_code}", f"{label} key={key} try {attempt + 1}: "
                       f"{response.text[:500]}")
        if response.status_code >= 500:
            result.server_errors += 1
        if response.status_code not in RETRY_STATUSES:
            break
    return Send(None, time.perf_counter() - t0, retries + 1)


async def create_phase(client: httpx.AsyncClient, args: argparse.Namespace, uris: list[str],
                       result: RunResult) -> None:
    next_index = iter(range(args.jobs))
    start = asyncio.Event()

    async def one_client(c: int) -> None:
        replays = c % 2 == 0
        await start.wait()
        for index in next_index:  # a shared iterator: each job goes to whichever client is free
            body = job_body(args, uris, result.run_id, index)
            key = f"{result.run_id}-{index}"
            label = f"job {index} (client {c})"
            if replays and args.replay == "concurrent":
                first, replay = await asyncio.gather(
                    send_create(client, body, key, args.retries, result, label),
                    send_create(client, body, key, args.retries, result, label + " replay"))
            else:
                first = await send_create(client, body, key, args.retries, result, label)
                replay = None
                if replays and first.job_id is not None:
                    replay = await send_create(client, body, key, args.retries, result, label + " replay")
            if first.job_id is None:
                if replay is None or replay.job_id is None:
                    result.not_created += 1
                    continue
                first, replay = replay, None  # the replay created (or found) the job
            result.ids[index] = first.job_id
            if replay is not None and replay.job_id is None:
                result.replays_failed += 1
            result.create_latencies.append(first.latency_s)
            if replay is not None and replay.job_id is not None:
                result.replay_latencies.append(replay.latency_s)
                if replay.job_id != first.job_id:
                    result.duplicated[f"key {key}"].append(f"first send -> {first.job_id}, replay -> "
                                                           f"{replay.job_id}")

    tasks = [asyncio.create_task(one_client(c)) for c in range(args.clients)]
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    result.create_wall_s = time.perf_counter() - t0


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


async def list_jobs(client: httpx.AsyncClient, since: datetime, status: str | None = None) -> list[dict[str, Any]]:
    """Every job created since `since` (newest first), page by page; stops at the first page reaching older ones."""
    items: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": PAGE}
        if after:
            params["after"] = after
        if status:
            params["status"] = status
        response = await client.get("/v1/merges", params=params)
        response.raise_for_status()
        page = response.json()
        items.extend(page["items"])
        after = page.get("next")
        oldest = _parse_time(page["items"][-1]["created_at"]) if page["items"] else None
        if not after or (oldest is not None and oldest < since):
            return items


def ours(items: Iterable[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    return [j for j in items if (j.get("metadata") or {}).get("bench_run") == run_id]


async def completion_phase(client: httpx.AsyncClient, args: argparse.Namespace, result: RunResult,
                           since: datetime, t_load: float) -> None:
    known = set(result.ids.values())
    deadline = time.perf_counter() + args.deadline
    last_report = 0.0
    while True:
        try:
            listed = ours(await list_jobs(client, since), result.run_id)
        except httpx.HTTPError as exc:
            result.problem("listing failed", f"GET /v1/merges: {type(exc).__name__}: {exc}")
            if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code >= 500:
                result.server_errors += 1
            listed = []
        status = {j["id"]: j["status"] for j in listed}
        done = sum(1 for i in known if status.get(i) in TERMINAL)
        now = time.perf_counter()
        if now - last_report >= 10:
            counts = Counter(status.get(i, "unlisted") for i in known)
            print(f"  [{now - t_load:6.1f} s] {done}/{len(known)} ended  {dict(sorted(counts.items()))}",
                  file=sys.stderr, flush=True)
            last_report = now
        if done == len(known) or now > deadline:
            break
        await asyncio.sleep(args.poll_interval)
    result.completion_wall_s = time.perf_counter() - t_load


async def verify(client: httpx.AsyncClient, result: RunResult, since: datetime) -> None:
    """GET every job, list them all once more and by status; fill lost, duplicated and failed."""
    semaphore = asyncio.Semaphore(20)

    async def get(job_id: str) -> None:
        async with semaphore:
            try:
                response = await client.get(f"/v1/merges/{job_id}")
            except httpx.HTTPError as exc:
                result.lost.setdefault(job_id, f"GET failed: {type(exc).__name__}: {exc}")
                return
        if response.status_code == 200:
            result.final[job_id] = response.json()
        else:
            result.lost.setdefault(job_id, f"GET answered {response.status_code}: {response.text[:200]}")
            if response.status_code >= 500:
                result.server_errors += 1

    await asyncio.gather(*(get(i) for i in result.ids.values()))
    for job_id, job in result.final.items():
        if job["status"] not in TERMINAL:
            result.lost.setdefault(job_id, f"still {job['status']} (stage {job['stage']}) at the deadline")
        elif job["status"] != "succeeded":
            result.failed[job_id] = (job.get("error") or {}).get("code", job["status"])

    listings = {"all": ours(await list_jobs(client, since), result.run_id)}
    for status in TERMINAL:
        listings[status] = ours(await list_jobs(client, since, status), result.run_id)
    for name, items in listings.items():
        seen = Counter(j["id"] for j in items)
        for job_id, n in seen.items():
            if n > 1:
                result.duplicated[f"job {job_id}"].append(f"listed {n} times in GET /v1/merges ({name})")
        for j in items:
            if j["id"] not in result.answered:
                key = f"key {result.run_id}-{j['metadata'].get('bench_job', '?')}"
                result.duplicated[key].append(f"job {j['id']} is in GET /v1/merges ({name}) but no 202 named it")
    by_key: defaultdict[str, set[str]] = defaultdict(set)
    for j in listings["all"]:
        by_key[j["metadata"].get("bench_job", "?")].add(j["id"])
    for key, job_ids in sorted(by_key.items()):
        if len(job_ids) > 1:
            result.duplicated[f"key {result.run_id}-{key}"].append(f"{len(job_ids)} jobs listed: {sorted(job_ids)}")
    all_ids = {j["id"] for j in listings["all"]}
    for job_id in result.ids.values():
        if job_id not in all_ids:
            result.lost.setdefault(job_id, "not in GET /v1/merges")
        status = result.final.get(job_id, {}).get("status")
        if status in TERMINAL and job_id not in {j["id"] for j in listings[status]}:
            result.lost.setdefault(job_id, f"{status} but not in GET /v1/merges?status={status}")


async def run_load(url: str, api_key: str, args: argparse.Namespace, uris: list[str], repeat: int) -> RunResult:
    run_id = f"r{repeat}-{secrets.token_hex(4)}"
    result = RunResult(run_id=run_id, jobs=args.jobs)
    limits = httpx.Limits(max_connections=2 * args.clients + 10, max_keepalive_connections=2 * args.clients + 10)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        since = datetime.now().astimezone() - timedelta(seconds=60)
        print(f"run {repeat} ({run_id}): creating {args.jobs} jobs from {args.clients} clients", file=sys.stderr,
              flush=True)
        t_load = time.perf_counter()
        await create_phase(client, args, uris, result)
        print(f"  created {len(result.ids)} in {result.create_wall_s:.1f} s; waiting for them to end",
              file=sys.stderr, flush=True)
        await completion_phase(client, args, result, since, t_load)
        await verify(client, result, since)
    return result


async def warm_up(url: str, api_key: str, args: argparse.Namespace, uris: list[str]) -> None:
    """`--warmup` jobs at once, waited for: a worker's first job imports the engine (torch), which no later one
    pays. Problems here are not counted; the measured runs will show them."""
    print(f"warm-up: {args.warmup} untimed jobs", file=sys.stderr, flush=True)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"},
                                 timeout=httpx.Timeout(args.timeout)) as client:
        bodies = [job_body(args, uris, "warmup", i) for i in range(args.warmup)]
        answers = await asyncio.gather(*(client.post("/v1/merges", json=b) for b in bodies))
        pending = {a.json()["id"] for a in answers if a.status_code == 202}
        deadline = time.perf_counter() + 300
        while pending and time.perf_counter() < deadline:
            await asyncio.sleep(0.5)
            for job_id in list(pending):
                response = await client.get(f"/v1/merges/{job_id}")
                if response.status_code != 200 or response.json()["status"] in TERMINAL:
                    pending.discard(job_id)


# --------------------------------------------------------------------------------------------------- reporting
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def metrics(result: RunResult) -> dict[str, float]:
    created = [_parse_time(j["created_at"]) for j in result.final.values()]
    ended = [j for j in result.final.values() if j["status"] in TERMINAL and j.get("finished_at")]
    finished = [_parse_time(j["finished_at"]) for j in ended]
    span = (max(finished) - min(c for c in created if c)).total_seconds() if finished and created else math.nan
    runs = [(_parse_time(j["finished_at"]) - _parse_time(j["started_at"])).total_seconds()
            for j in ended if j.get("started_at")]
    waits = [(_parse_time(j["started_at"]) - _parse_time(j["created_at"])).total_seconds()
             for j in ended if j.get("started_at")]
    ms = [x * 1000 for x in result.create_latencies]
    return {
        "jobs created (202)": len(result.ids),
        "create p50 (ms)": percentile(ms, 50),
        "create p99 (ms)": percentile(ms, 99),
        "create max (ms)": max(ms, default=math.nan),
        "replay p50 (ms)": percentile([x * 1000 for x in result.replay_latencies], 50),
        "replays (202)": len(result.replay_latencies),
        "creations/s": len(result.ids) / result.create_wall_s if result.create_wall_s else math.nan,
        "end-to-end jobs/s": len(ended) / span if span and span > 0 else math.nan,
        "job run time p50 (ms)": percentile([x * 1000 for x in runs], 50),
        "queue wait p50 (s)": percentile(waits, 50),
        "create phase (s)": result.create_wall_s,
        "load to last ended (s)": span,
        "client retries": result.retries,
        "not created": result.not_created,
        "replays failed": result.replays_failed,
        "5xx answers": result.server_errors,
        "lost": len(result.lost),
        "duplicated": len(result.duplicated),
        "failed": len(result.failed),
    }


SUMMED = {"jobs created (202)", "replays (202)", "client retries", "not created", "replays failed", "5xx answers",
          "lost", "duplicated", "failed"}


def fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def table(rows: list[tuple[str, list[str]]], header: list[str]) -> str:
    widths = [max(len(header[0]), *(len(r[0]) for r in rows))]
    for col in range(1, len(header)):
        widths.append(max(len(header[col]), *(len(r[1][col - 1]) for r in rows)))
    line = "+".join("-" * (w + 2) for w in widths)
    out = [f"+{line}+", "| " + " | ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w)
                                          in enumerate(zip(header, widths, strict=True))) + " |", f"+{line}+"]
    for name, values in rows:
        cells = [name.ljust(widths[0]), *(v.rjust(w) for v, w in zip(values, widths[1:], strict=True))]
        out.append("| " + " | ".join(cells) + " |")
    out.append(f"+{line}+")
    return "\n".join(out)


def machine() -> str:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    return (f"{cores} cores ({usable} usable){', ' + model if model else ''}{memory}; {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}")


def report(results: list[RunResult], args: argparse.Namespace, stack_desc: str, load_before: tuple[float, ...],
           load_after: tuple[float, ...]) -> str:
    per_run = [metrics(r) for r in results]
    names = list(per_run[0])
    header = ["metric", *(f"run {i + 1}" for i in range(len(results)))]
    if len(results) > 1:
        header.append("median (counts: sum)")
    rows = []
    for name in names:
        values = [m[name] for m in per_run]
        cells = [fmt(v) for v in values]
        if len(results) > 1:
            clean = [v for v in values if not math.isnan(v)]
            agg = sum(values) if name in SUMMED else (statistics.median(clean) if clean else math.nan)
            cells.append(fmt(agg))
        rows.append((name, cells))
    codes: Counter[str] = Counter()
    for r in results:
        codes.update(r.http_codes)
    options = (f"--jobs {args.jobs} --clients {args.clients} --workers {args.workers} --method {args.method} "
               f"--replay {args.replay} --retries {args.retries} --repeats {args.repeats} --deadline {args.deadline:g}"
               f" --poll-interval {args.poll_interval:g} --timeout {args.timeout:g} --warmup {args.warmup}"
               f"{' --s3' if args.s3 else ''}")
    lines = [
        "MergeForge API load benchmark",
        f"machine: {machine()}",
        f"load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.2f}' for x in load_after)}: the load generator, the API, the workers and Redis share "
        "these cores, and so does anything else running on this machine",
        f"stack: {stack_desc}",
        f"options: {options}",
        f"POST /v1/merges answers: {dict(sorted(codes.items()))}",
        table(rows, header),
        "Latency is the client's, from the first send to the 202 (retries included); creations/s = unique jobs / "
        "create phase; end-to-end jobs/s = ended jobs / (last finished_at - first created_at), server clock.",
    ]
    if len(results) > 1:
        lines.append("Quote the median column.")
    return "\n".join(lines)


def problems_text(results: list[RunResult], limit: int = SAMPLES) -> str:
    out = []
    for r in results:
        groups: defaultdict[str, list[str]] = defaultdict(list)
        for p in r.problems:
            groups[p.what].append(p.detail)
        for what, details in groups.items():
            out.append(f"run {r.run_id}: {len(details)} x {what}, e.g.:")
            out += [f"    {d}" for d in details[:limit]]
        if r.lost:
            reasons = Counter(v.split(":")[0] for v in r.lost.values())
            out.append(f"run {r.run_id}: {len(r.lost)} lost: {dict(reasons)}, e.g.:")
            out += [f"    {k}: {v}" for k, v in list(r.lost.items())[:limit]]
        if r.duplicated:
            out.append(f"run {r.run_id}: {len(r.duplicated)} duplicated, e.g.:")
            out += [f"    {what}: {'; '.join(dict.fromkeys(why))}" for what, why in list(r.duplicated.items())[:limit]]
        if r.failed:
            out.append(f"run {r.run_id}: {len(r.failed)} failed: {dict(Counter(r.failed.values()))}, e.g.:")
            for job_id in list(r.failed)[:limit]:
                error = r.final[job_id].get("error") or {}
                out.append(f"    {job_id}: {error.get('code')}: {str(error.get('message'))[:300]}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=500, help="job creations per run (default 500)")
    p.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50); the even-numbered "
                   "half re-send each request")
    p.add_argument("--workers", type=int, default=2, help="Celery workers to start, concurrency 1 each (default 2)")
    p.add_argument("--s3", action="store_true", help="SeaweedFS S3 storage instead of a file:// folder")
    p.add_argument("--method", default="linear", choices=["linear", "task_arithmetic"], help="merge method")
    p.add_argument("--replay", default="after", choices=["after", "concurrent"],
                   help="re-send after the first answer (default) or at the same time as the first send")
    p.add_argument("--retries", type=int, default=3, help="retries of a create answered 429/5xx or not at all")
    p.add_argument("--deadline", type=float, default=900.0, help="seconds after the create phase ends for every "
                   "job to end (default 900)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between listings (default 1)")
    p.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout per request, seconds (default 60)")
    p.add_argument("--repeats", type=int, default=1, help="runs on the same stack; the table adds the median")
    p.add_argument("--warmup", type=int, help="untimed jobs run to the end first, so each worker has imported the "
                   "engine (default: 2 per worker; 0: none)")
    p.add_argument("--url", help="benchmark this running service instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("MERGEFORGE_BENCH_API_KEY"),
                   help="with --url: the API key (default: $MERGEFORGE_BENCH_API_KEY)")
    p.add_argument("--checkpoints", nargs="+", metavar="URI", help="with --url: base then task model URIs")
    p.add_argument("--family-dir", type=Path, help="with --url: write the tiny family here (a folder the service "
                   "may read) and use file:// URIs")
    p.add_argument("--work-dir", type=Path, help="where the stack keeps its data and logs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (always kept when something failed)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.clients < 1 or args.workers < 1 or args.repeats < 1:
        p.error("--jobs, --clients, --workers and --repeats are at least 1")
    if args.warmup is None:
        args.warmup = 2 * args.workers
    if args.url and not args.api_key:
        p.error("--url needs --api-key (or $MERGEFORGE_BENCH_API_KEY)")
    if args.url and not (args.checkpoints or args.family_dir):
        p.error("--url needs --checkpoints URI... or --family-dir DIR (a folder that service may read)")
    if args.checkpoints and len(args.checkpoints) < 3:
        p.error("--checkpoints: a base and at least 2 task models")
    return args


# Ctrl-C and SIGTERM: outside the event loop, a KeyboardInterrupt from the handler (and a flag, checked again at
# each step, for the rare interrupt that lands in a __del__ and is dropped); inside it, the main task is cancelled.
_stop_signal: list[int] = []
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _on_signal(signum: int, _frame: Any) -> None:
    _stop_signal.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def check_stop() -> None:
    if _stop_signal:
        raise KeyboardInterrupt(f"signal {_stop_signal[0]}")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with SIGINT/SIGTERM cancelling the coroutine (then KeyboardInterrupt here)."""

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("no current task")

        def stop(signum: int) -> None:
            _stop_signal.append(signum)
            task.cancel()

        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop, sig)
        try:
            return await coro
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            install_signal_handlers()

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        raise KeyboardInterrupt("cancelled") from None
    finally:
        check_stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    root = (args.work_dir or Path(tempfile.mkdtemp(prefix="mergeforge-api-load-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    stack: Stack | None = None
    ok = False
    results: list[RunResult] = []
    try:
        load_before = os.getloadavg()
        if args.url:
            url, api_key = args.url.rstrip("/"), args.api_key
            if args.checkpoints:
                uris = list(args.checkpoints)
            else:
                uris = [p.resolve().as_uri() for p in write_family(args.family_dir)]
            stack_desc = f"external service {url}"
        else:
            print(f"starting Redis, {'SeaweedFS, ' if args.s3 else ''}{args.workers} worker(s) and the API "
                  f"under {root}", file=sys.stderr, flush=True)
            stack = Stack(root, args.workers, args.s3)
            t0 = time.perf_counter()
            stack.start()
            check_stop()
            folders = write_family(root / "inputs")  # a tenant may not name the service's own storage
            if stack.s3 is not None:
                uris = [stack.s3.upload_folder(f, f"inputs/{f.name}") for f in folders]
            else:
                uris = [f.as_uri() for f in folders]
            url, api_key = stack.url, stack.api_key
            stack_desc = (f"started here in {time.perf_counter() - t0:.1f} s: Redis (Valkey), "
                          f"{'SeaweedFS S3' if args.s3 else 'file:// storage'}, {args.workers} Celery worker(s) x "
                          "concurrency 1, API: uvicorn, 1 process")
        if args.warmup:
            run_async(warm_up(url, api_key, args, uris))
        for repeat in range(1, args.repeats + 1):
            results.append(run_async(run_load(url, api_key, args, uris, repeat)))
        dead = stack.dead() if stack else []
        text = report(results, args, stack_desc, load_before, os.getloadavg())
        print(text, flush=True)
        bad = any(r.lost or r.duplicated or r.failed or r.not_created or r.replays_failed or r.server_errors
                  for r in results)
        if bad or dead:
            print("\nThe service misbehaved:", file=sys.stderr)
            if dead:
                print(f"processes that died: {', '.join(dead)}", file=sys.stderr)
            print(problems_text(results), file=sys.stderr)
            if stack:
                print(f"\nlogs (all of them under {root}):\n{stack.logs()}", file=sys.stderr)
        else:
            noisy = [p for r in results for p in r.problems]
            if noisy:
                print("\nretried requests (all ended well):\n" + problems_text(results), file=sys.stderr)
            ok = True
    except KeyboardInterrupt:
        print("\ninterrupted; stopping what this script started", file=sys.stderr)
    except Exception as exc:
        print(f"\nerror: {type(exc).__name__}: {exc}", file=sys.stderr)
        if stack:
            print(f"\nlogs (all of them under {root}):\n{stack.logs()}", file=sys.stderr)
    finally:
        for sig in STOP_SIGNALS:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        if stack is not None:
            stack.stop()
        if ok and not args.keep and not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"work dir kept: {root}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
