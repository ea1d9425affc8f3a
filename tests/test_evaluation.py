"""Held-out evaluation: sampled answers per prompt and the unbiased pass@k estimator."""

from math import comb

import pytest

from rlpost.config import ConfigError, EvalConfig
from rlpost.evaluation import eval_metrics, ks_for, pass_at_k, with_eval_sampling
from rlpost.records import SamplingParams, Task, Trajectory


def test_pass_at_k_is_the_chance_that_one_of_k_draws_without_replacement_is_right():
    assert pass_at_k(4, 1, 1) == 0.25 and pass_at_k(4, 1, 2) == 0.5 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0 and pass_at_k(5, 3, 3) == 1.0  # n - c < k
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - comb(7, 2) / comb(10, 2))
    with pytest.raises(ValueError, match="n=2 c=3 k=1"):
        pass_at_k(2, 3, 1)
    assert ks_for(1) == [1] and ks_for(4) == [1, 2, 4] and ks_for(6) == [1, 2, 4, 6]


def _answers(task_id: str, rewards: list[float]) -> list[Trajectory]:
    task = Task(task_id, [1, 2], "x", len(rewards), SamplingParams())
    out = []
    for i, r in enumerate(rewards):
        t = Trajectory.start(task, i)
        t.reward = r
        out.append(t)
    return out


def test_eval_metrics_group_answers_by_prompt():
    trajs = _answers("a", [1.0, 0.0, 0.0, 0.0]) + _answers("b", [0.0] * 4) + _answers("c", [1.0, 1.0, 0.5, 0.0])
    m = eval_metrics(trajs, 4)
    assert m["eval/accuracy"] == pytest.approx(3.5 / 12)  # mean reward, partial credit included
    assert m["eval/pass@1"] == pytest.approx((0.25 + 0 + 0.5) / 3)  # solved = reward >= 1
    assert m["eval/pass@2"] == pytest.approx((0.5 + 0 + (1 - comb(2, 2) / comb(4, 2))) / 3)
    assert m["eval/pass@4"] == pytest.approx(2 / 3)
    assert eval_metrics(_answers("a", [1.0]) + _answers("b", [0.0]), 1) == {"eval/accuracy": 0.5}  # greedy


def test_eval_sampling_replaces_greedy_with_n_samples_and_keeps_the_budget():
    tasks = [Task("e0", [1], "x", 1, SamplingParams(0.0, 1.0, 7))]
    assert with_eval_sampling(tasks, EvalConfig())[0].sampling.temperature == 0.0  # default: greedy, as before
    task = with_eval_sampling(tasks, EvalConfig(samples_per_prompt=8, temperature=0.6, top_p=0.95))[0]
    assert task.group_size == 8 and task.sampling == SamplingParams(0.6, 0.95, 7)


@pytest.mark.parametrize("cfg, message", [
    (EvalConfig(samples_per_prompt=4), "eval.samples_per_prompt=4: needs eval.temperature > 0"),
    (EvalConfig(samples_per_prompt=0), "eval.samples_per_prompt=0: must be >= 1"),
    (EvalConfig(temperature=float("nan")), "eval.temperature=nan: must be >= 0"),
    (EvalConfig(temperature=1.0, top_p=0.0), "eval.top_p=0.0: must be in"),
])
def test_eval_config_errors_name_the_field(cfg, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cfg.validate()


def test_answer_rows_show_prompt_and_response_as_text_with_the_verdict():
    """A chat prompt holds the tokenizer's stop id inside its template: the row shows the whole
    prompt, not the part before it; the response stops at eos; plain info fields are kept."""
    from rlpost.evaluation import answer_rows
    from rlpost.tokenizer import make_tokenizer

    tok = make_tokenizer("qwen3_chat", "")
    task = Task("eval-x-0", tok.encode("What is 6*7?", bos=True), "42", 1, SamplingParams())
    t = Trajectory.start(task, 0)
    t.append(tok.encode("#### 42") + [tok.eos_id] + tok.encode("junk"), [0.0] * (len(tok.encode("#### 42")) + 2), 0)
    t.reward, t.env_info = 1.0, {"extracted": "42", "ended": True, "text": "#### 42", "nested": {"x": 1}}
    (row,) = answer_rows([t], tok)
    assert row["prompt"] == "user\nWhat is 6*7?\nassistant\n" and row["response"] == "#### 42"
    assert row["reward"] == 1.0 and row["env/extracted"] == "42" and row["env/ended"] is True
    assert "env/text" not in row and "env/nested" not in row and row["id"] == "eval-x-0/0"


def test_answer_rows_follow_the_eval_sets_order():
    from rlpost.evaluation import answer_rows
    from rlpost.tokenizer import CharTokenizer

    tok = CharTokenizer("0123456789+=")
    trajs = [Trajectory.start(Task(f"eval-after-{i}", tok.encode("1+1=", bos=True), "2", 2, SamplingParams()), j)
             for i in (10, 2, 1) for j in (1, 0)]
    assert [r["id"] for r in answer_rows(trajs, tok)] == ["eval-after-1/0", "eval-after-1/1", "eval-after-2/0",
                                                           "eval-after-2/1", "eval-after-10/0", "eval-after-10/1"]
