"""Quality benchmark, second half: every method through a running MergeForge service's HTTP API, then scored.

    python -m benchmarks.quality.prepare            # data and experts, once
    python -m benchmarks.quality.run [--api URL --key KEY] [--steps N] [--only ROW ...]

Without --api, the embedded service (`mergeforge serve`, one worker) is started on a free port for the run and
stopped after. Every merge is a job submitted with file:// URIs of the prepared folders; its artifacts are fetched
through the API (GET /v1/merges/{id}/artifacts), so the same script measures a remote service. Wall time is the
job's own (started_at to finished_at). Prints one Markdown table and writes `results.json` beside the data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path

import httpx

from .evaluate import base_with_head_accuracy, expert_accuracy, merged_accuracy

LWPTV = {"score": "saliency", "q": 0.1, "eta": 0.5}
# (row label, method, parameters); every row is also run with LwPTV.
MERGES: list[tuple[str, str, dict]] = [
    ("linear", "linear", {}),
    ("task arithmetic", "task_arithmetic", {"lambda": 0.3}),
    ("TIES", "ties", {"density": 0.2, "lambda": 1.0}),
    ("DARE-TIES", "dare_ties", {"drop_rate": 0.5, "lambda": 1.0}),
    ("AdaMerging task-wise", "adamerging", {"granularity": "task"}),
    ("AdaMerging layer-wise", "adamerging", {"granularity": "layer"}),
    ("AdaMerging++ layer-wise", "adamerging", {"granularity": "layer", "task_vectors": "ties"}),
    ("Tinting", "tinting", {}),
]
ADAPTIVE = {"adamerging", "tinting"}
ENDED = {"succeeded", "failed", "cancelled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def embedded_service(root: Path) -> Iterator[str]:
    """`mergeforge serve` on a free loopback port with its data under `root`; stopped on exit."""
    port = _free_port()
    log = (root / "serve.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                             str(root / "data")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MERGEFORGE_JOB_SOFT_TIME_LIMIT_S": "86400",
                                 "MERGEFORGE_JOB_TIME_LIMIT_S": "90000"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"mergeforge serve exited; see {root / 'serve.log'}")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"mergeforge serve did not get ready; see {root / 'serve.log'}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def job_body(prepared: Path, tasks: list[str], method: str, parameters: dict, lwptv: bool) -> dict:
    models = []
    for task in tasks:
        model = {"model": (prepared / "experts" / task).resolve().as_uri(), "name": task}
        if method in ADAPTIVE:
            model["data"] = (prepared / "data" / task / "unlabeled.jsonl").resolve().as_uri()
        models.append(model)
    return {"method": method, "base_model": (prepared / "base").resolve().as_uri(), "models": models,
            "parameters": parameters, **({"lwptv": LWPTV} if lwptv else {})}


def run_job(client: httpx.Client, body: dict, into: Path) -> float:
    """Submit, wait, download every artifact into `into`; returns the job's wall time in seconds."""
    response = client.post("/v1/merges", json=body)
    response.raise_for_status()
    job_id = response.json()["id"]
    while True:
        job = client.get(f"/v1/merges/{job_id}").json()
        if job["status"] in ENDED:
            break
        time.sleep(1.0)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
    for f in client.get(f"/v1/merges/{job_id}/artifacts").json()["files"]:
        target = into / f["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        with client.stream("GET", f["url"]) as stream, target.open("wb") as out:
            stream.raise_for_status()
            for block in stream.iter_bytes(1 << 20):
                out.write(block)
    started, finished = (datetime.fromisoformat(job[k]) for k in ("started_at", "finished_at"))
    return (finished - started).total_seconds()


def ood_sets(prepared: Path) -> dict[str, tuple[str, Path]]:
    """OOD set name -> (the in-distribution task it belongs to, its JSONL)."""
    return {p.stem: (p.stem.split("-", 1)[0], p) for p in sorted((prepared / "data" / "ood").glob("*.jsonl"))}


def score(prepared: Path, tasks: list[str], evaluate) -> dict[str, float]:
    """`evaluate(task, jsonl)` -> accuracy, for every task's test set and every OOD set."""
    scores = {task: evaluate(task, prepared / "data" / task / "test.jsonl") for task in tasks}
    scores.update({name: evaluate(task, path) for name, (task, path) in ood_sets(prepared).items()})
    return scores


def table(rows: list[dict], tasks: list[str], ood: list[str]) -> str:
    header = ["method", *tasks, "mean", *ood, "OOD mean", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        s = row["scores"]
        cells = [row["label"], *(f"{100 * s[t]:.1f}" for t in tasks), f"**{100 * row['mean']:.1f}**",
                 *(f"{100 * s[o]:.1f}" for o in ood), f"**{100 * row['ood_mean']:.1f}**",
                 f"{row['wall_s']:.0f}" if row["wall_s"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=Path(".bench/quality"))
    parser.add_argument("--api", help="a running service; default: start the embedded one")
    parser.add_argument("--key", default=os.environ.get("MERGEFORGE_API_KEY"), help="its API key, if it needs one")
    parser.add_argument("--steps", type=int, default=500, help="adaptive methods' steps (the papers' 500)")
    parser.add_argument("--batch-size", type=int, help="adaptive methods' inputs per task and step")
    parser.add_argument("--adamerging-lr", type=float, help="AdaMerging's learning rate (default its 1e-3); raise "
                        "it with fewer steps to give the coefficients the same room to move")
    parser.add_argument("--max-length", type=int, default=128, help="token limit of adaptive methods' inputs")
    parser.add_argument("--only", nargs="*", help="row labels to run (substring match); default: all")
    args = parser.parse_args(argv)
    prepared = args.prepared
    summary = json.loads((prepared / "prepared.json").read_text())
    tasks = [t["name"] for t in summary["tasks"]]
    ood = list(ood_sets(prepared))
    experts = {task: prepared / "experts" / task for task in tasks}
    rows: list[dict] = []

    def add(label: str, scores: dict[str, float], wall: float | None, **extra) -> None:
        row = {"label": label, "scores": scores, "wall_s": wall,
               "mean": sum(scores[t] for t in tasks) / len(tasks),
               "ood_mean": sum(scores[o] for o in ood) / max(len(ood), 1), **extra}
        rows.append(row)
        print(table([row], tasks, ood).splitlines()[-1], flush=True)

    print(table([], tasks, ood), flush=True)
    add("individual experts", score(prepared, tasks, lambda t, p: expert_accuracy(experts[t], p)), None)
    add("base + each expert's head",
        score(prepared, tasks, lambda t, p: base_with_head_accuracy(prepared / "base", experts[t], p)), None)
    adaptive_extra = {"steps": args.steps, "max_length": args.max_length,
                      **({"batch_size": args.batch_size} if args.batch_size else {})}
    work = Path(tempfile.mkdtemp(prefix="mergeforge-quality-"))
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    try:
        with (nullcontext(args.api) if args.api else embedded_service(work)) as url, \
                httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            for lwptv in (False, True):
                for label, method, parameters in MERGES:
                    label = f"{label} + LwPTV" if lwptv else label
                    if args.only and not any(o in label for o in args.only):
                        continue
                    params = {**parameters, **(adaptive_extra if method in ADAPTIVE else {}),
                              **({"lr": args.adamerging_lr} if method == "adamerging" and args.adamerging_lr else {})}
                    out = work / f"{method}-{len(rows)}"
                    wall = run_job(client, job_body(prepared, tasks, method, params, lwptv), out)
                    add(label, score(prepared, tasks, lambda t, p, out=out: merged_accuracy(out, t, experts[t], p)),
                        wall, method=method, parameters=params, lwptv=LWPTV if lwptv else None)
                    shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows, tasks, ood))
    by_label = {r["label"]: r for r in rows}
    experts_mean = by_label["individual experts"]["mean"]
    ta = by_label.get("task arithmetic")
    for label in ("AdaMerging layer-wise", "AdaMerging++ layer-wise", "Tinting"):
        if ta and label in by_label and experts_mean > ta["mean"]:
            closed = (by_label[label]["mean"] - ta["mean"]) / (experts_mean - ta["mean"])
            print(f"{label}: closes {100 * closed:.0f}% of the gap between task arithmetic and the experts")
    for label, r in by_label.items():
        if label.endswith(" + LwPTV") and (plain := by_label.get(label.removesuffix(" + LwPTV"))):
            print(f"{label}: OOD mean {100 * (r['ood_mean'] - plain['ood_mean']):+.1f}, in-distribution mean "
                  f"{100 * (r['mean'] - plain['mean']):+.1f} points vs without")
    (prepared / "results.json").write_text(json.dumps({"tasks": tasks, "ood": ood, "rows": rows,
                                                        "adaptive": adaptive_extra}, indent=2) + "\n")


if __name__ == "__main__":
    main()
