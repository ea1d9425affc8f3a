"""APRIL vs async vs sync on a long-tail workload, same model, hardware and trained samples.

    python bench/april.py                # 3 interleaved repeats of sync/async/april, ~9 minutes
    python bench/april.py --repeats 1    # quicker, noisier
    python bench/april.py --configs sync,april,april_recompute   # APRIL re-prefilling resumes
    python bench/april.py --name april_gpu_vllm engine=vllm engine.num_gpus=1 ...   # on a GPU

Each configuration is a full `python -m rlpost.run experiment=longtail_bench mode=...` run (Ray
actors, private redis-server, DeepSpeed trainer) from the same cached warm-up, training the same
number of samples; the repeats are interleaved so a slow spell of the machine hits every mode.
Throughput is trained samples per second of training (first step to last; the final evaluation
is not counted). Response lengths come from the model's own EOS decisions on a heavy-tailed
counting task; the table reports their p50/p99 as measured on the sync runs' trained samples.
Writes bench/results/april.json (or <name>.json); the last line is `RESULT april <mean april / mean
sync samples/s>`. Overrides on the command line replace a mode's own setting of the same key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_runs import ROOT, run_rlpost  # noqa: E402

MODES = {
    "sync": ["mode=sync"],
    "async": ["mode=async", "rollout.max_staleness=1", "engine.reuse_kv=true"],
    "april": ["mode=april", "rollout.over_sampling=2", "engine.reuse_kv=true"],
    # APRIL re-prefilling every resumed sample under the new weights instead of reusing its KV
    "april_recompute": ["mode=april", "rollout.over_sampling=2", "engine.reuse_kv=false"],
}


def mode_overrides(mode: str, extra: list[str]) -> list[str]:
    """The mode's overrides, minus any key the command line sets itself; KV retention is the
    native engine's, so it is left out when another engine is chosen (``engine=vllm``)."""
    given = {o.split("=", 1)[0] for o in extra}
    native = all(o.split("=", 1)[1] == "native" for o in extra if o.startswith("engine="))
    return [o for o in MODES[mode]
            if o.split("=", 1)[0] not in given and (native or not o.startswith("engine.reuse_kv="))]


def run_mode(mode: str, workdir: str, steps: int, extra: list[str], repeat: int) -> dict:
    run_dir = os.path.join(workdir, f"{mode}-{repeat}")
    t0 = time.time()
    run_rlpost(["experiment=longtail_bench", *mode_overrides(mode, extra), f"run_dir={run_dir}",
                f"trainer.steps={steps}", f"warmup.cache_dir={os.path.join(workdir, 'warmup')}",
                "logger.progress=false", *extra], mode)
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
        "lengths": lengths,
    }


def summarise(runs: list[dict]) -> dict:
    """Mean and std over the repeats of one configuration."""
    out: dict = {"repeats": len(runs)}
    for key in ("wall_s", "samples_per_s", "trained_tokens_per_s", "rollout_idle_frac", "trainer_idle_frac",
                "mean_staleness", "offpolicy_token_frac", "resumed_sample_frac", "eval_reward_before",
                "final_eval_reward"):
        vals = np.array([r[key] for r in runs], dtype=float)
        out[key] = float(vals.mean())
        out[key + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    out["stale_restarts"] = float(np.mean([r["stale_restarts"] for r in runs]))
    lengths = [n for r in runs for n in r["lengths"]]
    out["len_p50"], out["len_p99"] = float(np.percentile(lengths, 50)), float(np.percentile(lengths, 99))
    out["trained_samples"] = runs[0]["trained_samples"]
    out["runs"] = [{k: v for k, v in r.items() if k != "lengths"} for r in runs]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default="sync,async,april",
                        help=f"comma-separated, from: {', '.join(MODES)} (sync and april are required)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--name", default="april", help="results file: bench/results/<name>.json")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every mode")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="rlpost-bench-april-")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in MODES]
    if unknown or "sync" not in configs or "april" not in configs:
        parser.error(f"--configs={args.configs!r}: choose from {', '.join(MODES)}, including sync and april")
    runs: dict[str, list[dict]] = {mode: [] for mode in configs}
    for repeat in range(args.repeats):
        for mode in configs:
            runs[mode].append(run_mode(mode, workdir, args.steps, args.overrides, repeat))
            print(f"{mode} #{repeat}: {runs[mode][-1]['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
    results = {mode: summarise(r) for mode, r in runs.items()}
    sync = results["sync"]
    cols = ["wall_s", "samples_per_s", "trained_tokens_per_s", "rollout_idle_frac", "trainer_idle_frac",
            "mean_staleness", "final_eval_reward"]
    print(f"long-tail workload: response length p50={sync['len_p50']:.0f} p99={sync['len_p99']:.0f} "
          f"(p99/p50={sync['len_p99'] / max(sync['len_p50'], 1):.1f}), {sync['trained_samples']} trained "
          f"samples per run, mean +- std of {args.repeats} runs")
    print("| mode | " + " | ".join(cols) + " | vs sync |")
    print("|" + "---|" * (len(cols) + 2))
    for mode, r in results.items():
        cells = [f"{r[c]:.2f} +- {r[c + '_std']:.2f}" for c in cols]
        print(f"| {mode} | " + " | ".join(cells) + f" | {r['samples_per_s'] / sync['samples_per_s']:.2f}x |")
    ratio = results["april"]["samples_per_s"] / sync["samples_per_s"]
    paired = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs["april"], runs["sync"])]
    print("april/sync per repeat (runs adjacent in time): " + ", ".join(f"{r:.2f}x" for r in paired))
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", f"{args.name}.json"), "w") as fh:
        json.dump({"results": results, "april_over_sync": ratio, "april_over_sync_per_repeat": paired, "steps": args.steps, "repeats": args.repeats,
                   "modes": {c: MODES[c] for c in configs}, "command": "python bench/april.py " + " ".join(sys.argv[1:])}, fh, indent=2)
    print(f"RESULT april {ratio:.2f}")


if __name__ == "__main__":
    main()
