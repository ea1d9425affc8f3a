"""A user's own environment, loaded by import path (``env.name=custom_env:ReverseEnv``) in the
tests: reverse a string of digits, partial credit per correct character. It uses only the Env
protocol (rlpost/envs/base.py) and its own settings from ``env.options``."""

from __future__ import annotations

import random

from rlpost.envs.base import RewardResult, eval_task_set
from rlpost.records import SamplingParams, Task
from rlpost.tokenizer import CharTokenizer


class ReverseEnv:
    name = "reverse"
    reward_range = (0.0, 1.0)

    def __init__(self, cfg, sandbox=None):
        self.length = int(cfg.options.get("length", 3))
        self.tokenizer = CharTokenizer("0123456789=")
        self._eval = [self._digits(random.Random(f"eval/{i}")) for i in range(cfg.num_eval)]

    def _digits(self, rng: random.Random) -> str:
        return "".join(rng.choice("0123456789") for _ in range(self.length))

    def _task(self, digits: str, task_id: str, purpose: str, group_size: int, sampling: SamplingParams) -> Task:
        return Task(task_id=task_id, prompt_ids=self.tokenizer.encode(digits + "=", bos=True), answer=digits[::-1],
                    group_size=group_size, sampling=sampling, purpose=purpose, env=self.name)

    def train_task(self, index: int, seed: int, group_size: int, sampling: SamplingParams) -> Task:
        digits = self._digits(random.Random(f"train/{seed}/{index}"))
        return self._task(digits, f"train-{seed}-{index}", "train", group_size, sampling)

    def eval_tasks(self, tag: str, min_version: int) -> list[Task]:
        return eval_task_set(self._eval, self._task, tag, min_version, self.max_answer_len() + 1)

    def sft_example(self, index: int, seed: int) -> tuple[list[int], list[int]]:
        digits = self._digits(random.Random(f"train/{seed}/{index}"))
        return self.tokenizer.encode(digits + "=", bos=True), self.tokenizer.encode(digits[::-1]) + [self.tokenizer.eos_id]

    def max_answer_len(self) -> int:
        return self.length

    def score(self, answer: str, response_ids: list[int]) -> RewardResult:
        text = self.tokenizer.decode(response_ids)
        right = sum(a == b for a, b in zip(text, answer))
        return RewardResult(right / len(answer), {"text": text})


class NoScore:
    """An env missing half the protocol: refused at start-up with what it lacks named."""

    name = "broken"
    reward_range = (0.0, float("inf"))

    def __init__(self, cfg, sandbox=None):
        self.tokenizer = object()

    def train_task(self, *args):
        raise NotImplementedError


def raising(cfg, sandbox=None):
    raise RuntimeError("dataset server unreachable")
