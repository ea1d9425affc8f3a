"""Multi-turn tool environment: the model calls tools, observations are appended, it answers.

Format (character tokenizer): ``37*48=`` -> model writes ``[37*48]`` (a calculator call; ``]`` is a
stop token) -> the env appends the observation ``1776;`` -> the model writes ``1776`` and EOS.
``[py:CODE]`` runs CODE in the sandbox and observes its stdout. Observation tokens are tokenized
once, appended with loss mask 0, and never re-tokenized with the model's own tokens (token in,
token out). Every turn lives in the trajectory, so an APRIL round can cut a sample between or
inside turns and the resumed sample continues exactly where it stopped. Reward: exact match of
the final answer; ``max_turns`` bounds the tool calls.

The calculator evaluates a parsed arithmetic expression (numbers and + - * // % only, bounded
sizes); it never executes model output. Python tool calls only ever run inside the sandbox.
"""

from __future__ import annotations

import ast
import operator
import random

from rlpost.config import EnvConfig, SandboxConfig
from rlpost.envs.base import RewardResult, eval_task_set
from rlpost.records import SamplingParams, Task
from rlpost.tokenizer import CharTokenizer

ALPHABET = "0123456789+-*%/=[];:?pyrint() "
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod}


class CalculatorError(ValueError):
    pass


def calculate(expr: str, max_digits: int = 30) -> int:
    """Evaluate an integer arithmetic expression without executing anything."""
    if len(expr) > 64:
        raise CalculatorError("expression too long")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an expression: {expr!r}") from exc

    def ev(node) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
                raise CalculatorError("division by zero")
            value = _OPS[type(node.op)](left, right)
            if len(str(abs(value))) > max_digits:
                raise CalculatorError("result too large")
            return value
        raise CalculatorError(f"unsupported syntax in {expr!r}")

    return ev(tree)


class ToolEnv:
    """Multiplication the toy cannot do in its head, solved with a calculator tool."""

    name = "tools"
    reward_range = (0.0, 1.0)
    sandboxed = True  # runs model-written code: the driver smoke-tests the sandbox first

    def __init__(self, cfg: EnvConfig, sandbox_cfg: SandboxConfig | None = None):
        self.cfg = cfg
        self.sandbox_cfg = sandbox_cfg or SandboxConfig()
        self._pool = None
        self.tokenizer = CharTokenizer(ALPHABET)
        self.call_end = self.tokenizer.encode("]")[0]
        rng = random.Random(cfg.seed)
        self._eval = [self._problem(rng) for _ in range(cfg.num_eval)]
        self.stats = {"tool_calls": 0, "tool_errors": 0}

    # ------------------------------------------------------------------ tasks
    def _problem(self, rng: random.Random) -> tuple[int, int]:
        lo, hi = 10 ** (self.cfg.min_digits - 1), 10 ** self.cfg.max_digits - 1
        return rng.randint(max(lo, 2), hi), rng.randint(max(lo, 2), hi)

    def _task(self, a: int, b: int, task_id: str, purpose: str, group_size: int, sampling: SamplingParams) -> Task:
        return Task(task_id=task_id, prompt_ids=self.tokenizer.encode(f"{a}*{b}=", bos=True), answer=str(a * b),
                    group_size=group_size, sampling=sampling, purpose=purpose, env=self.name,
                    meta={"stop_ids": [self.call_end], "max_turns": self.cfg.max_turns})

    def train_task(self, index: int, seed: int, group_size: int, sampling: SamplingParams) -> Task:
        a, b = self._problem(random.Random(f"{self.cfg.seed}/{seed}/{index}"))
        return self._task(a, b, f"train-{seed}-{index}", "train", group_size, sampling)

    def eval_tasks(self, tag: str, min_version: int) -> list[Task]:
        make = lambda ab, *rest: self._task(*ab, *rest)  # noqa: E731  (items are (a, b) pairs)
        return eval_task_set(self._eval, make, tag, min_version, self.max_answer_len() + 1)

    def max_answer_len(self) -> int:
        digits = 2 * self.cfg.max_digits
        return (2 * self.cfg.max_digits + 3) + (digits + 1) + digits  # call + observation + answer

    def sft_example(self, index: int, seed: int) -> tuple[list[int], list[int], list[int]]:
        """(prompt, target, loss mask): a demonstration of one calculator call; the observation is
        part of the target sequence but masked out of the loss, as in RL. On
        ``env.teacher_skips_tool`` of them the teacher writes the product without the call: the
        toy learns to skip the tool about that often and then cannot multiply, which RL (reward:
        the right answer) has to unlearn."""
        a, b = self._problem(random.Random(f"{self.cfg.seed}/{seed}/{index}"))
        prompt = self.tokenizer.encode(f"{a}*{b}=", bos=True)
        if random.Random(f"teacher/{seed}/{index}").random() < self.cfg.teacher_skips_tool:
            answer = self.tokenizer.encode(str(a * b)) + [self.tokenizer.eos_id]
            return prompt, answer, [1] * len(answer)
        call = self.tokenizer.encode(f"[{a}*{b}]")
        obs = self.tokenizer.encode(f"{a * b};")
        answer = self.tokenizer.encode(str(a * b)) + [self.tokenizer.eos_id]
        return prompt, call + obs + answer, [1] * len(call) + [0] * len(obs) + [1] * len(answer)

    # ------------------------------------------------------------------ turns
    def observe(self, response_ids: list[int]) -> list[int]:
        """The observation for the tool call that ends ``response_ids`` (tokenized once)."""
        text = self.tokenizer.decode(response_ids)
        start = text.rfind("[")
        call = text[start + 1:-1] if start >= 0 and text.endswith("]") else ""
        self.stats["tool_calls"] += 1
        try:
            if call.startswith("py:"):
                result = self._python(call[3:])
            else:
                result = str(calculate(call))
        except Exception as exc:  # a broken call is an observation, not a crash
            self.stats["tool_errors"] += 1
            result = "?"  # a failed call observes "?"
            _ = exc
        safe = "".join(ch for ch in result if ch in ALPHABET and ch not in "[]")[:24]
        return self.tokenizer.encode(safe + ";")

    def _python(self, code: str) -> str:
        from rlpost.envs.sandbox import SandboxPool

        if self._pool is None:
            self._pool = SandboxPool(self.sandbox_cfg)
        res = self._pool.run_sync(code)
        return res.stdout.strip() if res.ok else "error"

    def score(self, answer: str, response_ids: list[int]) -> RewardResult:
        ids = list(response_ids)
        if self.tokenizer.eos_id not in ids:
            return RewardResult(0.0, {"reason": "no final answer"})
        text = self.tokenizer.decode(ids)
        final = text.rsplit(";", 1)[-1]
        calls = text.count("[")
        ok = final == answer
        return RewardResult(1.0 if ok else 0.0, {"final": final, "tool_calls": calls,
                                                 **({} if ok else {"reason": f"answer {final!r} != {answer!r}"})})
