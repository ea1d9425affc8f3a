"""The algorithm presets (``algorithm=grpo|dapo|gspo|dr_grpo|rloo|reinforce_pp``) side by side, at equal RL time.

    python bench/algorithms.py                        # six runs of toy_moe_local, ~27 minutes on 2 cores
    python bench/algorithms.py time_limit_s=400       # longer runs
    python bench/algorithms.py mode=april trainer.ppo_minibatches=2   # stale tokens, two updates per batch

Each run is the README's first command with one preset (configs/algorithm/), from the same cached
warm-up, for ``time_limit_s`` seconds of RL (200 unless overridden) with an evaluation every 100
steps. It checks that every recipe trains the toy, not which is best in general: on this task
(answers of 2-4 tokens, one update per batch in sync mode) the recipes differ little by design
(GSPO's sequence ratio is 1 on a single update; DAPO's overlong buffer is 1 token of 6). One run
per preset, so differences of a few points are noise. Writes bench/results/algorithms.json; the
last line is ``RESULT algorithms <the smallest held-out accuracy gain of a preset / GRPO's>``.
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

PRESETS = ("grpo", "dapo", "gspo", "dr_grpo", "rloo", "reinforce_pp")


def run(name: str, workdir: str, extra: list[str]) -> dict:
    run_dir = os.path.join(workdir, name)
    t0 = time.time()
    run_rlpost(["experiment=toy_moe_local", f"algorithm={name}", "time_limit_s=200", f"run_dir={run_dir}",
                f"warmup.cache_dir={os.path.join(workdir, 'warmup')}", "logger.progress=false", *extra], name)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    steps = [r for r in rows if "train/clip_frac" in r]
    evals = [r for r in rows if "eval/accuracy" in r]

    def mean(key: str) -> float:
        return round(sum(r.get(key, 0.0) for r in steps) / max(len(steps), 1), 5)

    return {"preset": name, "overrides": extra, "process_s": round(time.time() - t0, 1),
            "steps": summary["steps"], "rl_seconds": round(summary["rl_seconds"], 1),
            "eval_before": summary["eval_accuracy_before"], "eval_after": summary["eval_accuracy_after"],
            "gain": round(summary["eval_accuracy_after"] - summary["eval_accuracy_before"], 4),
            "curve": [(r["step"], round(r["eval/accuracy"], 4)) for r in evals],
            "clip_frac_mean": mean("train/clip_frac"), "step_s_mean": mean("train/step_s"),
            "filtered_groups": summary.get("filtered_groups", 0),
            "overlong_penalty_mean": mean("reward/overlong_penalty_mean")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="rlpost-bench-algorithms-")
    results = {}
    for name in PRESETS:  # the first run makes the warm-up the others start from
        results[name] = run(name, workdir, args.overrides)
        print(f"{name}: {results[name]['curve']}", file=sys.stderr, flush=True)
    print("held-out accuracy of toy_moe_local (greedy), one run per preset, same warm-up")
    print("| preset | steps | before | after | gain | clip frac | step s | dropped groups | overlong penalty |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['steps']} | {r['eval_before']:.3f} | {r['eval_after']:.3f} | {r['gain']:+.3f} | "
              f"{r['clip_frac_mean']:.4f} | {r['step_s_mean']:.3f} | {r['filtered_groups']} | "
              f"{r['overlong_penalty_mean']:.4f} |")
    base = results["grpo"]["gain"]
    ratio = min(r["gain"] for r in results.values()) / base if base > 0 else float("nan")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "algorithms.json"), "w") as fh:
        json.dump({"results": results, "smallest_gain_over_grpo": ratio, "cpu_count": os.cpu_count(),
                   "command": "python bench/algorithms.py " + " ".join(sys.argv[1:])}, fh, indent=2)
    print(f"RESULT algorithms {ratio:.2f}")


if __name__ == "__main__":
    main()
