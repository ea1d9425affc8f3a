"""Dynamic sampling (``rollout.filter_uniform_groups``) against plain GRPO, at equal RL wall time.

    python bench/dynamic_sampling.py                 # two runs of toy_moe_local, ~16 minutes on 2 cores
    python bench/dynamic_sampling.py --target 0.8 time_limit_s=200   # shorter

Both runs are the README's first command (`python -m rlpost.run experiment=toy_moe_local`: the
flawed teacher's warm-up, then GRPO for ``time_limit_s`` seconds with an evaluation every 100
steps), from the same cached warm-up, one with the filter off and one with it on. Late in RL most
groups are all right, so plain GRPO spends most of each batch on groups with zero advantage; the
filter drops them (up to 4 batches' worth per step) and trains on groups that still teach
something, at the price of generating the dropped ones. What counts is held-out accuracy against
RL wall time: the table has every evaluation's (seconds since RL began, accuracy), the final one,
the mean over the evaluations and the seconds each run took to first reach ``--target``. Both
runs evaluate every 100 steps (the experiment's setting); the filtered run's steps take longer,
so its curve is coarser in time and its "seconds to target" can only fall on its evaluations.
Writes bench/results/dynamic_sampling.json; the last line is ``RESULT dynamic_sampling <seconds
plain GRPO took to reach the target / seconds with the filter>`` (> 1: the filter got there sooner).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_runs import ROOT, run_rlpost  # noqa: E402

CONFIGS = {"grpo": ["rollout.filter_uniform_groups=false"], "filtered": ["rollout.filter_uniform_groups=true"]}


def run(name: str, workdir: str, extra: list[str]) -> dict:
    run_dir = os.path.join(workdir, name)
    t0 = time.time()
    run_rlpost(["experiment=toy_moe_local", *CONFIGS[name], f"run_dir={run_dir}",
                f"warmup.cache_dir={os.path.join(workdir, 'warmup')}", "logger.progress=false", *extra], name)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    evals = [r for r in rows if "eval/accuracy" in r]
    start = evals[0]["time_s"]  # the evaluation before RL ends where RL's clock starts
    curve = [(round(r["time_s"] - start, 1), round(r["eval/accuracy"], 4)) for r in evals]
    return {"config": name, "overrides": CONFIGS[name] + extra, "process_s": round(time.time() - t0, 1),
            "steps": summary["steps"], "rl_seconds": round(summary["rl_seconds"], 1),
            "trained_samples": summary["trained_samples"], "filtered_groups": summary.get("filtered_groups", 0),
            "eval_before": summary["eval_accuracy_before"], "eval_after": summary["eval_accuracy_after"],
            "eval_mean": round(sum(a for _, a in curve[1:]) / max(len(curve) - 1, 1), 4), "curve": curve}


def seconds_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.85, help="held-out accuracy to reach")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for both runs")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="rlpost-bench-dynsamp-")
    results = {}
    for name in CONFIGS:  # the first run makes the warm-up both start from
        results[name] = run(name, workdir, args.overrides)
        results[name]["seconds_to_target"] = seconds_to(results[name]["curve"], args.target)
        print(f"{name}: {results[name]['curve']}", file=sys.stderr, flush=True)
    print(f"held-out accuracy of toy_moe_local (greedy) against RL wall time (evaluations included); "
          f"target {args.target}")
    print("| config | steps | trained samples | dropped groups | final | mean of evals | s to target |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['steps']} | {r['trained_samples']} | {r['filtered_groups']} | {r['eval_after']:.3f} | "
              f"{r['eval_mean']:.3f} | {r['seconds_to_target']} |")
    plain, filtered = results["grpo"]["seconds_to_target"], results["filtered"]["seconds_to_target"]
    ratio = float("nan") if plain is None or not filtered else plain / filtered
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "dynamic_sampling.json"), "w") as fh:
        json.dump({"results": results, "target": args.target, "plain_over_filtered_seconds_to_target": ratio,
                   "cpu_count": os.cpu_count(),
                   "command": "python bench/dynamic_sampling.py " + " ".join(sys.argv[1:])},
                  fh, indent=2)
    print(f"RESULT dynamic_sampling {ratio:.2f}")


if __name__ == "__main__":
    main()
