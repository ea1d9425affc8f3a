"""Held-out evaluation: how eval tasks are sampled and what is reported.

Greedy decoding (one answer per prompt) is the default and what ``eval/accuracy`` has always
meant. ``eval.samples_per_prompt=n`` with ``eval.temperature > 0`` samples n answers per prompt,
as slime's ``--n-samples-per-eval-prompt`` and verl's validation ``n`` do: ``eval/accuracy`` is
then the mean reward over all n x prompts answers (mean@n, the pass@1 estimate), and
``eval/pass@k`` for k = 1, 2, 4, ... up to n (and n itself) is the unbiased estimator of Chen et
al. (2021, HumanEval): per prompt with c of n answers solved, 1 - C(n-c, k) / C(n, k), averaged
over prompts. An answer counts as solved when its reward is >= 1 (the trainer's
``reward/accuracy`` rule).

Every evaluation also keeps its answers (:func:`answer_rows`): ``<run_dir>/evals/<tag>.jsonl``
holds each prompt and answer as text with its reward and the env's verdict, and the first rows go
to wandb as a table (verl's logged validation generations, slime's debug rollout dumps): what
the policy actually writes is the first thing to read when a reward climbs suspiciously.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from math import comb
from typing import Any

from rlpost.config import EvalConfig
from rlpost.records import SamplingParams, Task, Trajectory


def with_eval_sampling(tasks: list[Task], cfg: EvalConfig) -> list[Task]:
    """The env's eval tasks (one greedy answer each) answered as ``cfg`` says: n samples at the
    configured temperature / top-p, the env's completion budget kept."""
    if cfg.samples_per_prompt == 1 and cfg.temperature == 0:
        return tasks
    for task in tasks:
        task.group_size = cfg.samples_per_prompt
        task.sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                       max_new_tokens=task.sampling.max_new_tokens)
    return tasks


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k answers drawn without replacement from n, of which c
    are correct, is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... <= n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [n]


def eval_metrics(trajs: list[Trajectory], samples_per_prompt: int) -> dict[str, float]:
    """``eval/accuracy`` (mean reward) and, with several samples per prompt, ``eval/pass@k``."""
    if not trajs:
        raise ValueError("evaluation returned no answers")
    out = {"eval/accuracy": sum(t.reward for t in trajs) / len(trajs)}
    if samples_per_prompt > 1:
        solved: dict[str, list[bool]] = defaultdict(list)
        for t in trajs:
            solved[t.task_id].append(t.reward >= 1.0)
        for k in ks_for(samples_per_prompt):
            scores = [pass_at_k(len(s), sum(s), min(k, len(s))) for s in solved.values()]
            out[f"eval/pass@{k}"] = sum(scores) / len(scores)
    return out


def answer_rows(trajs: list[Trajectory], tokenizer) -> list[dict[str, Any]]:
    """One row per answer, ordered by prompt: the prompt and response as text (the special ids
    the tokenizer would stop at are left out of the prompt), the reward and the env's verdict."""
    rows = []
    for t in sorted(trajs, key=lambda t: natural_key(t.traj_id)):
        rows.append({"id": t.traj_id, **sample_text(t.prompt_ids.tolist(), t.response_ids.tolist(), tokenizer),
                     "reward": t.reward, "status": t.status.value, "tokens": len(t), **verdict(t.env_info)})
    return rows


def sample_text(prompt_ids: list[int], response_ids: list[int], tokenizer) -> dict[str, str]:
    """A sample's prompt and response as text (the special ids the tokenizer stops at are left out
    of the prompt; the response ends at its eos, or, with a checkpoint's tokenizer, shows every
    turn with the chat markup: tool calls and their results)."""
    stop = getattr(tokenizer, "eos_id", None)
    response = getattr(tokenizer, "decode_turns", tokenizer.decode)(response_ids)
    return {"prompt": tokenizer.decode([i for i in prompt_ids if i != stop]), "response": response}


def verdict(env_info: dict[str, Any]) -> dict[str, Any]:
    """The env's verdict as ``env/<key>`` columns: plain values, long text cut to 500 characters
    (``text``, the response itself, left out)."""
    return {f"env/{k}": (v[:500] if isinstance(v, str) else v) for k, v in env_info.items()
            if isinstance(v, (str, int, float, bool)) and k != "text"}


def natural_key(traj_id: str) -> list:
    """``eval-x-2/0`` before ``eval-x-10/0``: prompts in their set's order, answers in theirs."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", traj_id)]


def write_answers(run_dir: str, tag: str, rows: list[dict[str, Any]]) -> str:
    folder = os.path.join(run_dir, "evals")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{tag}.jsonl")
    with open(path, "w") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path
