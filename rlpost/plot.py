"""The run's curve as a PNG: training reward per step and held-out eval accuracy."""

from __future__ import annotations

import json
import os

from rlpost.metrics import read_metrics


def plot_run(run_dir: str, out_name: str = "curve.png") -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = read_metrics(path)
    train = [(r["step"], r["reward/mean"]) for r in rows if "reward/mean" in r]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train reward (sampled, T=1)", alpha=0.6)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval accuracy (greedy, held-out)", color="C3")
    summary_path = os.path.join(run_dir, "summary.json")
    title = os.path.basename(run_dir)
    if os.path.exists(summary_path):
        with open(summary_path) as fh:
            s = json.load(fh)
        if s.get("eval_accuracy_before") is not None:
            title = (f"{s.get('name')}: eval {s['eval_accuracy_before']:.2f} -> {s['eval_accuracy_after']:.2f}"
                     f" in {s.get('rl_seconds', 0):.0f}s of RL")
    ax.set_title(title)
    ax.set_xlabel("RL step (0 = after SFT warm-up)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    out = os.path.join(run_dir, out_name)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
