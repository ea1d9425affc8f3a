"""APRIL vs async vs sync on a long-tail workload, same model, hardware and trained samples.

    python bench/april.py            # ~6 minutes on 2 CPU cores
    python bench/april.py --steps 20 # quicker, noisier

Each mode is a full `python -m rlpost.run experiment=longtail_bench mode=...` run (Ray actors,
private redis-server, DeepSpeed trainer) from the same cached warm-up, training the same number of
samples. Response lengths come from the model's own EOS decisions on a heavy-tailed counting
task; the table reports their p50/p99 as measured on the sync run's trained samples.
Writes bench/results/april.json; the last line is `RESULT april <april/sync samples-per-s ratio>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {
    "sync": ["mode=sync"],
    "async": ["mode=async", "rollout.max_staleness=1"],
    "april": ["mode=april", "rollout.over_sampling=2"],
}


def run_mode(mode: str, workdir: str, steps: int, extra: list[str]) -> dict:
    run_dir = os.path.join(workdir, mode)
    cmd = [sys.executable, "-m", "rlpost.run", "experiment=longtail_bench", *MODES[mode], f"run_dir={run_dir}",
           f"trainer.steps={steps}", f"warmup.cache_dir={os.path.join(workdir, 'warmup')}",
           "logger.progress=false", *extra]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{mode} run failed with exit code {proc.returncode}")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    steps_rows = [r for r in rows if "train/samples" in r]
    lengths = [n for line in open(os.path.join(run_dir, "trained_ids.rank0.jsonl"))
               for n in json.loads(line)["lengths"]]

    def mean(key: str) -> float:
        vals = [r[key] for r in steps_rows if key in r]
        return float(np.mean(vals)) if vals else 0.0

    return {
        "mode": mode,
        "wall_s": summary["train_seconds"],
        "process_s": time.time() - t0,
        "trained_samples": summary["trained_samples"],
        "samples_per_s": summary["trained_samples"] / summary["train_seconds"],
        "trained_tokens_per_s": summary["trained_tokens"] / summary["train_seconds"],
        "rollout_idle_frac": mean("rollout/idle_frac"),
        "trainer_idle_frac": mean("train/idle_frac"),
        "mean_staleness": mean("weights/version_lag_mean"),
        "offpolicy_token_frac": mean("offpolicy/token_frac"),
        "resumed_sample_frac": mean("offpolicy/resumed_sample_frac"),
        "stale_restarts": steps_rows[-1].get("rollout/stale_restarts", 0) if steps_rows else 0,
        "eval_reward_before": summary["eval_accuracy_before"],
        "final_eval_reward": summary["eval_accuracy_after"],
        "len_p50": float(np.percentile(lengths, 50)),
        "len_p99": float(np.percentile(lengths, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every mode")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="rlpost-bench-april-")
    results = {}
    for mode in MODES:
        results[mode] = run_mode(mode, workdir, args.steps, args.overrides)
        print(f"{mode}: {results[mode]['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
    sync = results["sync"]
    cols = ["wall_s", "samples_per_s", "trained_tokens_per_s", "rollout_idle_frac", "trainer_idle_frac",
            "mean_staleness", "final_eval_reward"]
    print(f"long-tail workload: response length p50={sync['len_p50']:.0f} p99={sync['len_p99']:.0f} "
          f"(p99/p50={sync['len_p99'] / max(sync['len_p50'], 1):.1f}), {sync['trained_samples']} trained samples per mode")
    print("| mode | " + " | ".join(cols) + " | speed-up |")
    print("|" + "---|" * (len(cols) + 2))
    for mode, r in results.items():
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print(f"| {mode} | " + " | ".join(cells) + f" | {r['samples_per_s'] / sync['samples_per_s']:.2f}x |")
    ratio = results["april"]["samples_per_s"] / sync["samples_per_s"]
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "april.json"), "w") as fh:
        json.dump({"results": results, "april_over_sync": ratio, "steps": args.steps,
                   "command": "python bench/april.py " + " ".join(sys.argv[1:])}, fh, indent=2)
    print(f"RESULT april {ratio:.2f}")


if __name__ == "__main__":
    main()
