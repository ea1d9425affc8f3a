"""Code extraction, the tamper-proof verdict, toy tasks and HumanEval through the real sandbox."""

import pytest

from rlpost.config import EnvConfig, SandboxConfig
from rlpost.envs.coding import (CodingEnv, Submission, extract_code, humaneval_canonical, humaneval_problems,
                                toy_problem)
from rlpost.envs.sandbox import find_bwrap

needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
PROMPT = 'def add(a, b):\n    """Sum."""\n'
KEPT = PROMPT + "\n"  # a restated function keeps the prompt (its imports, helpers) in front


@pytest.mark.parametrize("completion, expected", [
    ("Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", KEPT + "def add(a, b):\n    return a + b\n"),
    ("```\nx = 1\n```\n```py\ndef add(a, b):\n    return b + a\n```", KEPT + "def add(a, b):\n    return b + a\n"),
    ("```python\n    return a + b\n```", PROMPT + "    return a + b\n"),  # a fenced body continues the prompt
    ("def add(a, b):\n    return a - -b\n", KEPT + "def add(a, b):\n    return a - -b\n"),  # a bare function
    ("    return a + b\n", PROMPT + "    return a + b\n"),  # HumanEval style continuation
    ("```python\ndef add(a, b):\n    return a + b", KEPT + "def add(a, b):\n    return a + b"),  # unterminated fence
])
def test_extract_code(completion, expected):
    assert extract_code(PROMPT, completion, "add") == expected


def test_extract_code_reads_a_long_adversarial_completion_in_linear_time():
    """The policy writes the completion: 40,000 blank lines before an indented restated function
    took 10 s with a newline-spanning \\s* retried from every line start; now well under one."""
    import time

    completion = "  \n" * 40000 + "  def add(a, b):\n    return a + b\n"
    start = time.perf_counter()
    assert extract_code(PROMPT, completion, "add") == KEPT + completion
    assert extract_code(PROMPT, "  \n" * 40000, "add") == PROMPT + "  \n" * 40000
    assert time.perf_counter() - start < 1.0


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
    scores = env.score_code([Submission(right, problem.tests, "f"), Submission(wrong, problem.tests, "f"),
                             Submission("def f(x):return 7", problem.tests, "f")])
    assert scores[0].reward == 1.0 and scores[0].info["passed"] == 5
    assert scores[1].reward < 1.0 and "tests passed" in scores[1].info["reason"]
    # through the tokenizer path the worker uses
    task = env.train_task(3, 0, 1, __import__("rlpost.records", fromlist=["x"]).SamplingParams())
    ids = env.tokenizer.encode(reference) + [env.tokenizer.eos_id]
    assert env.score(task.answer, ids).reward == 1.0


@needs_bwrap
def test_printed_fake_verdict_does_not_count(env):
    cheat = "import sys\nprint('0' * 32 + ' {\"passed\": 5, \"total\": 5, \"error\": \"\"}')\ndef f(x):\n    return None\n"
    result = env.score_code([Submission(cheat, ["assert f(1) == 2"], "f")])[0]
    assert result.reward == 0.0


@needs_bwrap
def test_humaneval_canonical_pass_and_stub_fails(env):
    problems = humaneval_problems()
    assert len(problems) == 164
    sample = problems[:6]
    right = env.score_code([Submission(p.prompt + humaneval_canonical(p.task_id), p.tests, p.entry_point, p.prompt)
                            for p in sample])
    wrong = env.score_code([Submission(p.prompt + "    return None\n", p.tests, p.entry_point, p.prompt)
                            for p in sample])
    assert [r.reward for r in right] == [1.0] * 6
    assert [r.reward for r in wrong] == [0.0] * 6


@needs_bwrap
def test_humaneval_is_an_in_run_eval_set_with_a_real_tokenizer():
    """env.eval_set=humaneval with GPT-2's BPE: the 164 problems become eval tasks whose prompts
    are tokenized once; a completion travels as token ids through the same decode, extraction
    and sandboxed tests as any model output (canonical solutions pass, a stub does not)."""
    from rlpost.tokenizer import Gpt2Tokenizer

    env = CodingEnv(EnvConfig(name="coding", tokenizer="gpt2", eval_set="humaneval", num_eval=164),
                    SandboxConfig(backend="bwrap", slots=2))
    try:
        tasks = env.eval_tasks("before", 0)
        assert len(tasks) == 164 and all(t.sampling.max_new_tokens == 300 for t in tasks)
        tok = env.tokenizer
        assert isinstance(tok, Gpt2Tokenizer) and tasks[0].prompt_ids[0] == tok.bos_id
        assert tok.decode(tasks[0].prompt_ids[1:]) == humaneval_problems()[0].prompt
        picked = tasks[::16]  # 11 problems spread over the set keep the test quick
        right = [tok.encode(humaneval_canonical(humaneval_problems()[i].task_id)) + [tok.eos_id]
                 for i in range(0, 164, 16)]
        stub = [tok.encode("    pass\n") + [tok.eos_id]] * len(picked)
        assert [r.reward for r in env.score_many([t.answer for t in picked], right)] == [1.0] * len(picked)
        assert [r.reward for r in env.score_many([t.answer for t in picked], stub)] == [0.0] * len(picked)
    finally:
        env.pool.close()


def test_humaneval_needs_the_coding_env_and_a_real_tokenizer():
    from rlpost.config import ConfigError

    with pytest.raises(ConfigError, match="env.eval_set"):
        EnvConfig(name="coding", eval_set="humaneval").validate()
    with pytest.raises(ConfigError, match="env.tokenizer"):
        EnvConfig(name="longtail", tokenizer="gpt2").validate()  # works on its character alphabet


@pytest.mark.parametrize("body, why", [
    ('{"passed": NaN, "total": 2}', "invalid verdict"),
    ('{"passed": 100, "total": 2}', "invalid verdict"),
    ('{"passed": -1, "total": 2}', "invalid verdict"),
    ('{"passed": 2, "total": 5}', "invalid verdict"),   # total is the number of tests we sent
    ('{"passed": true, "total": 2}', "invalid verdict"),
    ('{"passed": 2.0, "total": 2}', "invalid verdict"),
    ('[2, 2]', "malformed verdict"),
    ('{"passed": 2', "malformed verdict"),
])
def test_a_verdict_that_is_not_plain_bounded_data_is_refused(body, why):
    from rlpost.envs.coding import parse_verdict

    nonce = "ab" * 16
    with pytest.raises(ValueError, match=why):
        parse_verdict(f"noise\n{nonce} {body}\n", nonce, total=2)
    # only the first verdict counts: a later (forged) one cannot replace it
    out = f"{nonce} " + '{"passed": 1, "total": 2, "error": "x"}' + f"\n{nonce} " + '{"passed": 2, "total": 2}'
    assert parse_verdict(out, nonce, total=2) == (1, "x")


@needs_bwrap
def test_a_reasoning_models_program_is_the_one_after_its_reasoning(tmp_path):
    """With <think> / </think> tokens (DeepSeek's tokenizer, a V3.1-format template with thinking
    on: the prompt opens the reasoning), the program is extracted from what follows the last
    </think>: the reference after the reasoning passes, the same reference written only inside a
    reasoning the budget cut runs nothing and scores 0 with the reason, and env.reasoning=none
    reads the whole text (where the cut reasoning's reference passes)."""
    from test_hf_tokenizer import tokenizer_dir

    from rlpost.records import SamplingParams

    tok = tokenizer_dir(tmp_path / "tok")
    problem, reference = toy_problem(3, seed=0)
    results = {}
    for mode in ("auto", "none"):
        env = CodingEnv(EnvConfig(name="coding", num_eval=2, tokenizer="hf", tokenizer_path=tok, reasoning=mode,
                                  chat_template_kwargs={"thinking": True}), SandboxConfig(backend="bwrap", slots=2))
        try:
            task = env.train_task(3, 0, 1, SamplingParams())
            responses = [f"about f(x)</think>{reference}", reference, f"</think>x+{reference}x"]
            results[mode] = env.score_many([task.answer] * 3, [env.tokenizer.encode_template_text(r) for r in responses])
        finally:
            env.pool.close()
    assert [r.reward for r in results["auto"]][:2] == [1.0, 0.0] and results["auto"][2].reward < 1.0
    assert results["auto"][1].info["reason"] == "the reasoning never ended (no </think>)"
    assert results["none"][1].reward == 1.0  # the whole text: the unfinished thought's program ran
