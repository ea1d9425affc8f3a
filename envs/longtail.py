"""A long-tail generation workload: count up to n, where n is heavy-tailed.

Prompt ``"37:"``, answer ``"1234567890123...`` (n digits, cycling) then EOS. Target lengths are
drawn log-normally (median ``len_median``, shape ``len_sigma``, capped at ``len_max``), so after a
warm-up the model's *own* EOS decisions produce a heavy-tailed response-length distribution, the
way reasoning traces behave: most samples are short, a few are very long. Reward: exact match.
This is the benchmark workload for partial rollouts (bench/april.py), where the slowest samples
of a batch decide how long synchronous RL waits.
"""

from __future__ import annotations

import math
import random

from rlpost.config import EnvConfig
from rlpost.envs.base import RewardResult, eval_task_set
from rlpost.records import SamplingParams, Task
from rlpost.tokenizer import CharTokenizer

ALPHABET = "0123456789:"


def counting(n: int) -> str:
    return "".join(str((i + 1) % 10) for i in range(n))


class LongTailEnv:
    name = "longtail"
    reward_range = (0.0, 1.0)

    def __init__(self, cfg: EnvConfig):
        self.cfg = cfg
        self.tokenizer = CharTokenizer(ALPHABET)
        rng = random.Random(cfg.seed)
        self._eval = [self._length(rng) for _ in range(cfg.num_eval)]

    def _length(self, rng: random.Random) -> int:
        n = round(math.exp(rng.gauss(math.log(self.cfg.len_median), self.cfg.len_sigma)))
        return max(1, min(self.cfg.len_max, n))

    def train_length(self, index: int, seed: int) -> int:
        return self._length(random.Random(f"{self.cfg.seed}/{seed}/{index}"))

    def max_answer_len(self) -> int:
        return self.cfg.len_max

    def _task(self, n: int, task_id: str, purpose: str, group_size: int, sampling: SamplingParams) -> Task:
        return Task(task_id=task_id, prompt_ids=self.tokenizer.encode(f"{n}:", bos=True), answer=counting(n),
                    group_size=group_size, sampling=sampling, purpose=purpose, env=self.name)

    def train_task(self, index: int, seed: int, group_size: int, sampling: SamplingParams) -> Task:
        return self._task(self.train_length(index, seed), f"train-{seed}-{index}", "train", group_size, sampling)

    def eval_tasks(self, tag: str, min_version: int) -> list[Task]:
        return eval_task_set(self._eval, self._task, tag, min_version, self.cfg.len_max + 1)

    def sft_example(self, index: int, seed: int) -> tuple[list[int], list[int]]:
        n = self.train_length(index, seed)
        return self.tokenizer.encode(f"{n}:", bos=True), self.tokenizer.encode(counting(n)) + [self.tokenizer.eos_id]

    def score(self, answer: str, response_ids: list[int]) -> RewardResult:
        text = self.tokenizer.decode(response_ids)
        ended = self.tokenizer.eos_id in list(response_ids)
        return RewardResult(1.0 if ended and text == answer else 0.0, {"len": len(response_ids), "ended": ended})
