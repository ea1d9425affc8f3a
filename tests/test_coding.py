"""Code extraction, the tamper-proof verdict, toy tasks and HumanEval through the real sandbox."""

import pytest

from rlpost.config import EnvConfig, SandboxConfig
from rlpost.envs.coding import CodingEnv, extract_code, humaneval_canonical, humaneval_problems, toy_problem
from rlpost.envs.sandbox import find_bwrap

needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
PROMPT = 'def add(a, b):\n    """Sum."""\n'


@pytest.mark.parametrize("completion, expected", [
    ("Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", "def add(a, b):\n    return a + b\n"),
    ("```\nx = 1\n```\n```py\ndef add(a, b):\n    return b + a\n```", "def add(a, b):\n    return b + a\n"),
    ("```python\n    return a + b\n```", PROMPT + "    return a + b\n"),  # a fenced body continues the prompt
    ("def add(a, b):\n    return a - -b\n", "def add(a, b):\n    return a - -b\n"),  # a bare function
    ("    return a + b\n", PROMPT + "    return a + b\n"),  # HumanEval style continuation
    ("```python\ndef add(a, b):\n    return a + b", "def add(a, b):\n    return a + b"),  # unterminated fence
])
def test_extract_code(completion, expected):
    assert extract_code(PROMPT, completion, "add") == expected


def test_expression_style_takes_the_first_line():
    assert extract_code("def f(x):return ", "x+3\nimport os", "f", "expression") == "def f(x):return x+3"


@pytest.fixture(scope="module")
def env():
    e = CodingEnv(EnvConfig(name="coding", num_eval=4), SandboxConfig(backend="bwrap", slots=2))
    yield e
    e.pool.close()


@needs_bwrap
def test_toy_tasks_score_fraction_of_tests(env):
    problem, reference = toy_problem(3, seed=0)
    right = problem.prompt + reference
    wrong = problem.prompt + "x"
    scores = env.score_code([(right, problem.tests), (wrong, problem.tests), ("def f(x):return 7", problem.tests)])
    assert scores[0].reward == 1.0 and scores[0].info["passed"] == 5
    assert scores[1].reward < 1.0 and "tests passed" in scores[1].info["reason"]
    # through the tokenizer path the worker uses
    task = env.train_task(3, 0, 1, __import__("rlpost.records", fromlist=["x"]).SamplingParams())
    ids = env.tokenizer.encode(reference) + [env.tokenizer.eos_id]
    assert env.score(task.answer, ids).reward == 1.0


@needs_bwrap
def test_printed_fake_verdict_does_not_count(env):
    cheat = "import sys\nprint('0' * 32 + ' {\"passed\": 5, \"total\": 5, \"error\": \"\"}')\ndef f(x):\n    return None\n"
    result = env.score_code([(cheat, ["assert f(1) == 2"])])[0]
    assert result.reward == 0.0


@needs_bwrap
def test_humaneval_canonical_pass_and_stub_fails(env):
    problems = humaneval_problems()
    assert len(problems) == 164
    sample = problems[:6]
    right = env.score_code([(p.prompt + humaneval_canonical(p.task_id), p.tests) for p in sample])
    wrong = env.score_code([(p.prompt + "    return None\n", p.tests) for p in sample])
    assert [r.reward for r in right] == [1.0] * 6
    assert [r.reward for r in wrong] == [0.0] * 6
