"""deploy/ is part of the product: its files parse, the runs they launch are valid rlpost configs
(composed and validated exactly as the driver would), and the files and commands they use exist."""

import os
import re
import shlex
import subprocess

import pytest
import yaml

from rlpost.cli_config import load_config

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")
REPO = os.path.dirname(DEPLOY)


def overrides_after_rlpost_run(command: str) -> list[str]:
    words = shlex.split(command.replace("\\\n", " "))
    return words[words.index("rlpost.run") + 1:]


def test_kuberay_rayjob_runs_a_valid_config_with_secrets_from_the_environment():
    job = yaml.safe_load(open(os.path.join(DEPLOY, "kuberay-rayjob.yaml")))
    assert job["kind"] == "RayJob"
    overrides = overrides_after_rlpost_run(job["spec"]["entrypoint"])
    cfg = load_config(overrides)  # composes and validates: every key and value is real
    assert cfg.run_root and cfg.buffer.url and cfg.buffer.password is None  # no secret on the command line
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"] for c in head["containers"] for e in c.get("env", [])}
    assert "RLPOST_REDIS_PASSWORD" in env
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               * g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    asked = cfg.trainer.num_gpus + cfg.rollout.num_workers * cfg.engine.num_gpus
    assert asked <= gpus, (asked, gpus)  # the placement groups fit the cluster
    mounts = {m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    assert cfg.run_root in mounts  # the run root is the shared volume
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:  # where the actors run: /dev/shm
        spec = group["template"]["spec"]  # large enough for the shm weight slots (64 MB otherwise)
        shm = [m["name"] for c in spec["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm and any(v["name"] == shm[0] and v.get("emptyDir", {}).get("medium") == "Memory"
                           for v in spec["volumes"])


def test_ray_cluster_yaml_commands_exist_and_its_example_run_is_valid():
    cluster = yaml.safe_load(open(os.path.join(DEPLOY, "ray-cluster.yaml")))
    for command in cluster["setup_commands"]:
        for script in re.findall(r"scripts/[\w./-]+", command):
            assert os.path.exists(os.path.join(REPO, script)), script
    assert any("--dashboard-host=127.0.0.1" in c for c in cluster["head_start_ray_commands"])
    text = open(os.path.join(DEPLOY, "ray-cluster.yaml")).read()
    example = " ".join(line.lstrip("# ").rstrip("\\") for line in text.splitlines()[:6] if line.startswith("#"))
    load_config(overrides_after_rlpost_run(example[example.index("python -m rlpost.run"):].split("(")[0]))


def test_dockerfile_copies_what_exists_and_installs_the_sandbox_dependencies():
    text = open(os.path.join(DEPLOY, "Dockerfile")).read()
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert os.path.exists(os.path.join(REPO, path)), path
    for package in ("redis-server", "bubblewrap", "libseccomp2"):
        assert package in text


def test_redis_conf_is_safe_by_default():
    conf = open(os.path.join(DEPLOY, "redis.conf")).read()
    active = [line for line in conf.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "bind 127.0.0.1 -::1" in active and "protected-mode yes" in active
    assert not any(line.startswith("requirepass") for line in active)  # no well-known password
    assert "maxmemory-policy noeviction" in active and "appendonly yes" in active


def test_submit_script_parses_and_sets_a_persistent_run_root():
    path = os.path.join(DEPLOY, "submit_local.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    assert "run_root=$PWD/outputs" in text and "--dashboard-host=127.0.0.1" in text


@pytest.mark.parametrize("name", ["kuberay-rayjob.yaml", "ray-cluster.yaml"])
def test_yaml_files_parse(name):
    assert yaml.safe_load(open(os.path.join(DEPLOY, name)))


def test_the_gpu_check_plans_run_valid_configs_and_fit_one_device_call(tmp_path):
    """scripts/gpu_check.sh is run on a GPU lent for 15 minutes: a config key renamed since it was
    written would waste that session. Its dry run composes and validates every run it would start,
    and each plan's stage limits must fit one device call (10 minutes) with the deadline it keeps."""
    import sys

    env = dict(os.environ, GPU_CHECK_DRY="1", PYTHON=sys.executable, OUT=str(tmp_path))
    got = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "a", "b", "c"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stdout + got.stderr
    runs = re.findall(r"config ok: rlpost.run .*name=(\w+)", got.stdout)
    assert sorted(set(runs)) == ["gpu_local", "gpu_sglang_sync", "gpu_vllm_april", "gpu_vllm_sync"], got.stdout
    script = open(os.path.join(REPO, "scripts", "gpu_check.sh")).read()
    deadline = int(re.search(r"GPU_CHECK_DEADLINE_S:-(\d+)", script).group(1))
    assert deadline <= 570  # a call runs at most 600 s, and the archive is made after the deadline
    bad = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "nope"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown stage 'nope'" in bad.stderr
