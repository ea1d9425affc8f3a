"""Ray nodes the tests start and stop themselves: `ray start --block` in a temporary dir of its
own, stopped by SIGTERM, which ends exactly the processes that node started (`ray stop` ends every
Ray on the machine: the session's shared head, another test's cluster, a user's own)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ray_node(temp_dir: str, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`ray start --block` with ``args`` and ``--temp-dir=temp_dir`` (keep it short: Ray's unix
    sockets live there), returned once the node is up, with the cluster's GCS address. A head and a
    node joining one alike write that address to the dir's ``ray_current_cluster`` when started."""
    log_path = os.path.join(temp_dir, "ray-start.log")
    with open(log_path, "w") as log:
        node = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block",
                                 "--disable-usage-stats", f"--temp-dir={temp_dir}", *args],
                                env={**(env or os.environ), "RAY_AUTH_MODE": "disabled"}, stdout=log,
                                stderr=subprocess.STDOUT)
    address_file = os.path.join(temp_dir, "ray_current_cluster")
    deadline = time.time() + 120
    while not (address := _read(address_file)):
        if node.poll() is not None or time.time() > deadline:
            stop_ray_node(node)
            raise AssertionError(f"ray start {' '.join(args)} did not come up:\n{_read(log_path)[-3000:]}")
        time.sleep(0.2)
    return node, address


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return ""


def stop_ray_node(node: subprocess.Popen) -> None:
    """SIGTERM: `ray start --block` ends the processes it started, then itself."""
    if node.poll() is not None:
        return
    node.send_signal(signal.SIGTERM)
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        node.kill()
        node.wait()
