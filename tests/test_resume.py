"""Stop an APRIL run mid-way, resume it from its checkpoint: no prompt lost, none trained twice."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlpost.buffer import RedisBuffer, connect
from rlpost.records import unpack_entry, unpack_task
from test_e2e import cli_env

ARGS = ["experiment=longtail_bench", "mode=april", "rollout.over_sampling=2", "rollout.batch_prompts=4",
        "rollout.group_size=2", "rollout.max_new_tokens=40", "env.len_max=39", "engine.chunk_tokens=4", "engine.max_batch_size=8",
        "warmup.steps=5", "env.num_eval=8", "trainer.checkpoint_every=2", "logger.progress=false"]


def trained_steps(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line)["step"] for line in open(path) if '"train/samples"' in line]


@pytest.mark.slow
def test_april_run_survives_a_kill_and_resume(tmp_path, redis_url, ray_head):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "rlpost.run", *ARGS, f"run_dir={run_dir}", f"buffer.url={redis_url}"]
    first = subprocess.Popen(cmd + ["trainer.steps=50"], env=cli_env(ray_head), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 400
    while max(trained_steps(run_dir), default=0) < 3:
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "first run made no progress"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)  # stop mid-run, past the step-2 checkpoint
    assert first.wait(timeout=120) == 130
    killed_after = max(trained_steps(run_dir))
    resume_from = int(open(os.path.join(run_dir, "checkpoints", "latest_driver")).read().strip()[4:])
    assert 2 <= resume_from <= killed_after  # the latest checkpoint, not one past the kill
    total = max(killed_after, resume_from) + 3  # the resumed run re-does the lost steps, then more

    proc = subprocess.run(cmd + [f"trainer.steps={total}"], env=cli_env(ray_head), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["steps"] == total

    records = [json.loads(line) for line in open(os.path.join(run_dir, "trained_ids.rank0.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, total + 1))  # lost steps redone once
    ids = [i for r in records for i in r["ids"]]
    assert len(ids) == len(set(ids)), "a sample was trained twice"
    assert len(ids) == total * 4 * 2

    # every prompt ever submitted is trained or still waiting in the buffer
    state = json.load(open(os.path.join(run_dir, "checkpoints", f"step{total}", "driver_state.json")))
    run_id = open(os.path.join(run_dir, "run_id")).read().strip()  # kept across the resume
    assert run_id.startswith(os.path.basename(run_dir) + "-")
    buf = RedisBuffer(connect(redis_url), run_id)
    waiting = {unpack_task(f[b"data"]).task_id for _, f in buf.client.xrange(buf.key("tasks"))}
    for stream in ("partials", "complete"):
        waiting |= {unpack_entry(f[b"data"]).task.task_id for _, f in buf.client.xrange(buf.key(stream))}
    trained_tasks = {i.split("/")[0] for i in ids}
    submitted = {f"train-0-{i}" for i in range(state["task_index"])}
    assert submitted <= trained_tasks | waiting, sorted(submitted - trained_tasks - waiting)[:5]
    assert not (trained_tasks & waiting)
