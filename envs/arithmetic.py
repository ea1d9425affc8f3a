"""Procedural arithmetic with an exact-match reward: a task a toy model can learn on a CPU.

Prompts look like ``"37+5="``; the answer is the integer result, optionally written least
significant digit first (``reverse_answer``), which small transformers learn much faster because
carries then flow left to right. Train prompts are drawn from a seeded stream that excludes the
held-out eval set, so eval accuracy measures generalisation, not memorisation.

The supervised warm-up can be distilled from a *flawed teacher* (``teacher_carry_error``): on
that fraction of the additions that need a carry, the demonstration drops the carry (``19+5=14``),
the way a weak model's traces are wrong. More SFT on such data cannot fix it; RL against the
exact-match verifier can. That is the situation RL post-training exists for, in miniature.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlpost.config import EnvConfig
from rlpost.records import SamplingParams, Task
from rlpost.tokenizer import CharTokenizer
from rlpost.tokenizer import ended as response_ended
from rlpost.tokenizer import env_tokenizer

from rlpost.envs.base import RewardResult, eval_task_set

ALPHABET = "0123456789+-*="


def make_tokenizer() -> CharTokenizer:
    return CharTokenizer(ALPHABET)


@dataclass
class Problem:
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    def carry_free_sum(self) -> int:
        """What a teacher that forgets every carry writes for an addition."""
        a, b, out, place = self.a, self.b, 0, 1
        while a or b:
            out += ((a % 10 + b % 10) % 10) * place
            a, b, place = a // 10, b // 10, place * 10
        return out

    def needs_carry(self) -> bool:
        return self.op == "+" and self.carry_free_sum() != self.a + self.b

    def answer(self, reverse: bool, value: int | None = None) -> str:
        if value is None:
            value = {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]
        text = str(abs(value))
        if reverse:
            text = text[::-1]
        return ("-" if value < 0 else "") + text


class ArithmeticEnv:
    name = "arithmetic"
    reward_range = (0.0, 1.0)

    def __init__(self, cfg: EnvConfig):
        self.cfg = cfg
        self.tokenizer = env_tokenizer(cfg, ALPHABET)
        rng = random.Random(cfg.seed)
        self._eval = []
        seen: set[str] = set()
        while len(self._eval) < cfg.num_eval:
            p = self._draw(rng)
            if p.prompt not in seen:
                seen.add(p.prompt)
                self._eval.append(p)
        self._eval_prompts = seen

    def _draw(self, rng: random.Random) -> Problem:
        def number() -> int:
            digits = rng.randint(self.cfg.min_digits, self.cfg.max_digits)
            return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)

        return Problem(number(), rng.choice(list(self.cfg.ops)), number())

    def train_problem(self, index: int, seed: int = 0) -> Problem:
        """The ``index``-th training problem of stream ``seed``: deterministic, never an eval one."""
        rng = random.Random(f"{self.cfg.seed}/{seed}/{index}")
        while True:
            p = self._draw(rng)
            if p.prompt not in self._eval_prompts:
                return p

    def max_answer_len(self) -> int:
        big = 10 ** self.cfg.max_digits - 1
        value = big * big if "*" in self.cfg.ops else 2 * big
        return len(str(value)) + 1

    def _task(self, p: Problem, task_id: str, purpose: str, group_size: int,
              sampling: SamplingParams) -> Task:
        return Task(task_id=task_id, prompt_ids=self.tokenizer.encode(p.prompt, bos=True),
                    answer=p.answer(self.cfg.reverse_answer), group_size=group_size,
                    sampling=sampling, purpose=purpose, env=self.name)

    def train_task(self, index: int, seed: int, group_size: int, sampling: SamplingParams) -> Task:
        return self._task(self.train_problem(index, seed), f"train-{seed}-{index}", "train",
                          group_size, sampling)

    def eval_tasks(self, tag: str, min_version: int) -> list[Task]:
        return eval_task_set(self._eval, self._task, tag, min_version, self.max_answer_len() + 1)

    def sft_example(self, index: int, seed: int) -> tuple[list[int], list[int]]:
        """(prompt ids, target ids incl. eos) for supervised warm-up, from the (maybe flawed) teacher."""
        p = self.train_problem(index, seed)
        value = None
        if p.needs_carry() and random.Random(f"teacher/{seed}/{index}").random() < self.cfg.teacher_carry_error:
            value = p.carry_free_sum()
        return (self.tokenizer.encode(p.prompt, bos=True),
                self.tokenizer.encode(p.answer(self.cfg.reverse_answer, value)) + [self.tokenizer.eos_id])

    def score(self, answer: str, response_ids: list[int]) -> RewardResult:
        text = self.tokenizer.decode(response_ids)
        ended = response_ended(self.tokenizer, response_ids)
        correct = ended and text == answer
        return RewardResult(1.0 if correct else 0.0, {"text": text, "ended": ended})

