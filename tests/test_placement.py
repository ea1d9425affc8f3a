"""Placement on a real multi-node Ray cluster (two raylets on this machine, Ray's own
``ray.cluster_utils.Cluster``): trainer ranks spread over both nodes train together with DeepSpeed
(gloo), the rendezvous is on rank 0's node, workers on both nodes reach the buffer (a TCP Redis
with a password, since the run joins an existing cluster), and placement.json says where each
actor ran."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.mark.slow
def test_ranks_and_workers_spread_over_two_nodes_train_together(tmp_path, two_node_cluster):
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlpost.run", "experiment=toy_moe_local", f"run_dir={run_dir}",
         f"ray_address={two_node_cluster.address}", "placement.strategy=STRICT_SPREAD",
         "trainer.num_ranks=2", "trainer.zero_stage=2", "rollout.num_workers=2", "rollout.batch_prompts=8",
         "warmup.steps=4", "trainer.steps=3", "env.num_eval=8", "eval.every=0", "logger.progress=false"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    placed = json.loads((run_dir / "placement.json").read_text())
    ranks, workers = placed["actors"]["trainer"], placed["actors"]["workers"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["node_id"] for r in ranks}) == 2, ranks      # one rank per node
    assert len({w["node_id"] for w in workers}) == 2, workers  # one worker per node
    rank0 = next(b for b in placed["trainer"] if b["node_id"] == ranks[0]["node_id"])
    assert placed["master"] == f"{rank0['node_ip']}:{rank0['free_port']}"  # rendezvous on rank 0's node
    assert placed["buffer"].startswith("redis://"), placed["buffer"]        # TCP, reachable from both
    assert "password" not in json.dumps(placed).lower()
    assert placed["weight_transport"] == "ray"  # auto: a worker is off rank 0's node, so no /dev/shm
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["weight_transport"] == "ray"
    per_rank = [[json.loads(line) for line in open(run_dir / f"trained_ids.rank{r}.jsonl")] for r in (0, 1)]
    assert all([r["step"] for r in rank] == [1, 2, 3] for rank in per_rank)  # both ranks trained every step


def test_bundles_a_fixed_cluster_cannot_hold_are_refused_with_the_fields_named(small_cfg):
    """On a Ray the driver started (it never grows) bundles beyond its resources fail at once:
    two ranks asking for a GPU each on a one-GPU machine, colocated halves fit."""
    import copy

    from rlpost.placement import PlacementError, _check_fits

    cfg = copy.deepcopy(small_cfg)
    cfg.trainer.num_ranks, cfg.trainer.num_gpus, cfg.engine.num_gpus = 2, 2, 0
    ranks = [{"CPU": 1, "GPU": 1.0}, {"CPU": 1, "GPU": 1.0}]
    with pytest.raises(PlacementError, match=r"the run needs 2 GPU in all \(trainer.num_gpus=2, engine.num_gpus=0; "
                                             r"bundles trainer: .*\) and this machine's Ray has 1"):
        _check_fits(cfg, {"trainer": ranks, "rollout": [{"CPU": 1}]}, {"CPU": 16, "GPU": 1})
    _check_fits(cfg, {"trainer": [{"CPU": 2, "GPU": 1.0}]}, {"CPU": 16, "GPU": 1})  # colocated: fits
    with pytest.raises(PlacementError, match=r"needs 3 CPU in all \(trainer.threads=1, rollout.threads=1"):
        _check_fits(cfg, {"trainer": [{"CPU": 1}, {"CPU": 1}], "rollout": [{"CPU": 1}]}, {"CPU": 2})
