"""One full ``python -m rlpost.run`` as a benchmark's unit of work (shared by the run-level
benchmarks): the product's own command line, in a subprocess, with the environment a local run
needs; a failed run stops the benchmark with the run's own error."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_rlpost(overrides: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "rlpost.run", *overrides]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{what} run failed with exit code {proc.returncode}")
