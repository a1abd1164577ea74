"""`mergeforge`: the engine's commands (merge, methods) and `serve`, the embedded default."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.core.redis_server import RedisServer

    loopback = args.host in ("localhost",) or ipaddress.ip_address(
        "127.0.0.1" if args.host == "localhost" else args.host).is_loopback
    keys = os.environ.get("MERGEFORGE_API_KEYS")
    if not loopback and not keys:
        print("error: serving beyond loopback needs API keys (MERGEFORGE_API_KEYS)", file=sys.stderr)
        return 2
    data = args.data_dir.expanduser().resolve()
    redis = RedisServer(data / "redis").start()
    env = {
        **os.environ,
        "MERGEFORGE_REDIS_URL": redis.url,
        "MERGEFORGE_STORAGE_URL": (data / "storage").as_uri(),
        "MERGEFORGE_CACHE_DIR": str(data / "cache"),
        "MERGEFORGE_WORK_DIR": str(data / "work"),
        "MERGEFORGE_FILE_ROOTS": json.dumps([str(Path.home()), str(Path.cwd()), str(data)]),
        "MERGEFORGE_ALLOW_ANONYMOUS": "false" if keys else "true",
        "MERGEFORGE_WEBHOOK_ALLOW_PRIVATE": os.environ.get("MERGEFORGE_WEBHOOK_ALLOW_PRIVATE",
                                                          "true" if loopback else "false"),
    }
    os.environ.update(env)
    from app.core.config import Settings  # settings are read from the environment just set
    from app.main import create_app

    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.celery_app:celery_app", "worker",
                               "-Q", "cpu,gpu", "--concurrency", str(args.workers), "--loglevel", "warning",
                               "-n", "embedded@%h"], env=env)
    url = f"http://{args.host}:{args.port}"
    print(f"MergeForge {url}  (docs {url}/docs; data {data}; Redis {redis.url})", flush=True)
    if not keys:
        print("warning: no API keys configured: anyone on this machine can use this service (loopback only)",
              flush=True)
    try:
        uvicorn.run(create_app(Settings()), host=args.host, port=args.port, log_level="warning")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        redis.stop()
        print("stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from workers.engine.cli import add_commands

    parser = argparse.ArgumentParser(prog="mergeforge", description="Model merging: the engine's commands and "
                                     "the service.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    serve = sub.add_parser("serve", help="run the API, a worker and a private Redis on this machine, with file "
                           "storage under DATA_DIR; Ctrl-C stops everything")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", type=Path, default=Path("~/.local/share/mergeforge"))
    serve.add_argument("--workers", type=int, default=1, help="concurrent merges")
    serve.set_defaults(run=_serve)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
