"""Training samples as text: every ``logger.rollouts_every`` RL steps, the samples that step
trained on go to ``<run_dir>/rollouts/step<N>.jsonl``, one row per sample: prompt and response
as text, reward, advantage, status, the env's verdict, the policy versions that wrote the
trained tokens and how often the sample was resumed (verl's ``trainer.rollout_data_dir``,
slime's ``--save-debug-rollout-data``). Reward hacking shows first in what the policy writes on
the prompts it is trained on; the eval answers (``evals/``) show it only on held-out prompts.

The trainer ranks hold no tokenizer (the env's may need the env's data to build): each rank
returns its part of the batch as token ids with its step metrics, under ``SAMPLES_KEY``, and the
driver decodes all ranks' rows with the env's tokenizer into one file.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rlpost.evaluation import natural_key, sample_text, verdict
from rlpost.records import Trajectory

SAMPLES_KEY = "rollout_samples"  # popped from a rank's step metrics by the driver, never logged


def trained_rows(trajs: list[Trajectory], advantages: list[float]) -> list[dict[str, Any]]:
    """The trainer's side: one plain row per trained sample, token ids not yet text."""
    rows = []
    for t, advantage in zip(trajs, advantages):
        trained = t.versions[t.loss_mask.astype(bool)]
        rows.append({"id": t.traj_id, "prompt_ids": t.prompt_ids.tolist(), "response_ids": t.response_ids.tolist(),
                     "reward": float(t.reward), "advantage": float(advantage), "status": t.status.value,
                     "tokens": len(t), "trained_tokens": int(t.loss_mask.sum()),
                     "versions": [int(trained.min()), int(trained.max())] if trained.size else [],
                     "resumes": int(t.num_resumes), "env_info": verdict(t.env_info)})
    return rows


def write_rollouts(run_dir: str, step: int, rows: list[dict[str, Any]], tokenizer) -> list[dict[str, Any]]:
    """The driver's side: decode every rank's rows, write ``rollouts/step<step>.jsonl`` (a step
    run again after a trainer restart replaces its file) and return the rows as written."""
    folder = os.path.join(run_dir, "rollouts")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step{step}.jsonl")
    out = []
    for row in sorted(rows, key=lambda r: natural_key(r["id"])):
        text = sample_text(row["prompt_ids"], row["response_ids"], tokenizer)
        out.append({"id": row["id"], **text, **{k: row[k] for k in ("reward", "advantage", "status", "tokens",
                                                                    "trained_tokens", "versions", "resumes")},
                    **row["env_info"]})
    with open(path + ".tmp", "w") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    os.replace(path + ".tmp", path)
    return out
