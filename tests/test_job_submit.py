"""`ray start --head`, a second node, then `ray job submit --working-dir .` of a run, as a user
launches one on a cluster. The job must succeed and leave its run dir (summary, final model) in
the persistent run_root, not in Ray's temporary copy of the working dir."""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from ray_nodes import free_port, start_ray_node, stop_ray_node

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_ray_job_submit_on_a_two_node_local_cluster(tmp_path):
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bindir}:{os.environ['PATH']}",
           "WANDB_MODE": "offline"}
    gcs, dash = free_port(), free_port()

    def ray_cli(*args, timeout=120):
        return subprocess.run([os.path.join(bindir, "ray"), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)

    # each node its own temporary dir, as two machines would: sharing one, the second node's
    # runtime-env agent unpacked the job's working dir over the one the driver was importing from
    # (FileNotFoundError: rollout/worker.py, one CI run in a few); both stopped on their own
    # (tests/ray_nodes.py), not by `ray stop`, which would also end the session's ray_head.
    head_dir, node_dir = (tempfile.mkdtemp(prefix=f"rlpost-{n}-", dir="/tmp") for n in ("head", "node2"))
    nodes = []
    try:
        nodes.append(start_ray_node(head_dir, "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                                    f"--ray-client-server-port={free_port()}",
                                    f"--dashboard-agent-listen-port={free_port()}", env=env)[0])
        nodes.append(start_ray_node(node_dir, f"--address=127.0.0.1:{gcs}", "--num-cpus=2", env=env)[0])
        root = tmp_path / "outputs"
        job = ray_cli("job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", REPO,
                      "--runtime-env-json", json.dumps({"excludes": [".venv", "outputs", ".git", "wandb", "*.pyc"]}),
                      "--", "python", "-m", "rlpost.run", "experiment=toy_moe_local", f"run_root={root}",
                      "placement.strategy=STRICT_SPREAD", "rollout.num_workers=2", "rollout.batch_prompts=4",
                      "warmup.steps=4", "trainer.steps=2", "env.num_eval=8", "eval.every=0", "logger.progress=false",
                      timeout=600)
        assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-2000:])
        assert "succeeded" in job.stdout, job.stdout[-3000:]
        summaries = glob.glob(str(root / "*" / "*" / "summary.json"))
        assert len(summaries) == 1, (summaries, job.stdout[-2000:])
        run_dir = os.path.dirname(summaries[0])
        assert f"rlpost: run dir {run_dir}" in job.stdout  # printed at start
        assert json.load(open(summaries[0]))["steps"] == 2
        assert os.path.exists(os.path.join(run_dir, "final", "model.safetensors"))
        placed = json.load(open(os.path.join(run_dir, "placement.json")))
        assert len({w["node_id"] for w in placed["actors"]["workers"]}) == 2  # one worker on each node
    finally:
        for node in reversed(nodes):
            stop_ray_node(node)
        for path in (head_dir, node_dir):
            shutil.rmtree(path, ignore_errors=True)


def test_a_job_whose_run_dir_would_vanish_with_rays_session_is_refused(tmp_path):
    """Inside Ray's copy of --working-dir, the default ./outputs is deleted with the session."""
    fake = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "repo"
    fake.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "rlpost.run", "experiment=toy_moe_local"], cwd=fake,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RLPOST_RUN_ROOT": "", "PYTHONPATH": REPO})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "inside Ray's temporary copy of the job's working dir" in proc.stderr and "run_root=" in proc.stderr
