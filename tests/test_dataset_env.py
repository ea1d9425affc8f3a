"""env=dataset: a user's JSONL prompts with the math, exact or their own verifier."""

import json
import re

import pytest

from rlpost.config import ConfigError, EnvConfig
from rlpost.envs.answers import equivalent, extract_answer
from rlpost.envs.base import score_group_with_timeout
from rlpost.envs.dataset import DatasetEnv
from rlpost.records import SamplingParams


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def additions(n: int) -> list[dict]:
    return [{"question": f"{a}+{a % 7}=", "label": a + a % 7, "solution": f"{a}+{a % 7}={a + a % 7}"}
            for a in range(10, 10 + n)]


def env_for(path, **kw) -> DatasetEnv:
    cfg = EnvConfig(name="dataset", train_path=path, prompt_key="question", answer_key="label",
                    **{"num_eval": 5, **kw})
    cfg.validate()
    return DatasetEnv(cfg)


def test_records_split_into_held_out_and_a_seeded_training_stream(tmp_path):
    env = env_for(write_jsonl(tmp_path / "d.jsonl", additions(30)), sft_key="solution", prompt_template="Q: {prompt}")
    held = {r.prompt for r in env._eval}
    assert len(held) == 5 and len(env._train) == 25
    epoch = [env.train_record(i, seed=0).prompt for i in range(25)]
    assert sorted(epoch) == sorted(r.prompt for r in env._train) and not held & set(epoch)  # each once, none held out
    assert [env.train_record(i, 0).prompt for i in range(25, 50)] != epoch  # the next epoch is reshuffled
    assert env.train_record(7, 0) == DatasetEnv(env.cfg).train_record(7, 0)  # same record on every node
    task = env.train_task(3, 0, 4, SamplingParams(1.0, 1.0, 8))
    rec = env.train_record(3, 0)
    assert env.tokenizer.decode(task.prompt_ids) == "Q: " + rec.prompt and task.answer == rec.answer
    prompt, target = env.sft_example(3, 0)
    assert env.tokenizer.decode(target) == rec.sft_target and target[-1] == env.tokenizer.eos_id
    evals = env.eval_tasks("before", 0)
    assert len(evals) == 5 and evals[0].sampling.temperature == 0 and evals[0].purpose == "eval:before"
    assert evals[0].sampling.max_new_tokens == env.max_answer_len() + 1


def test_an_eval_file_is_used_as_given(tmp_path):
    env = env_for(write_jsonl(tmp_path / "t.jsonl", additions(8)), eval_path=write_jsonl(tmp_path / "e.json.l", additions(3)))
    assert len(env._train) == 8 and [r.answer for r in env._eval] == ["13", "15", "17"]
    listed = tmp_path / "t.json"
    listed.write_text(json.dumps(additions(8)))
    assert len(env_for(str(listed), num_eval=2)._train) == 6  # a .json list works as well


@pytest.mark.parametrize("content, message", [
    ('{"question": "1+1=", "label": 2}\n{"question": "2+2="}\n', r"t.jsonl': record 2 has no usable env.answer_key='label'"),
    ('{"question": "1+1=", "label": 2}\nnot json\n', r"t.jsonl': line 2 is not JSON"),
    ('["1+1=", 2]\n', r"t.jsonl': record 1 is list, not an object"),
    ('{"question": "", "label": 2}\n', r"record 1 has no usable env.prompt_key='question'"),
    ('{"question": "1+1=", "label": true}\n', r"record 1 has no usable env.answer_key='label'"),
    ("\n", r"t.jsonl': no records"),
])
def test_bad_records_are_config_errors_naming_file_line_and_key(tmp_path, content, message):
    (tmp_path / "t.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=message):
        env_for(str(tmp_path / "t.jsonl"), num_eval=1)


def test_config_errors_for_the_dataset_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", additions(4))
    with pytest.raises(ConfigError, match=r"env.num_eval=5: env.train_path has only 4 records"):
        env_for(path)
    with pytest.raises(ConfigError, match=r"env.train_path='/nope.jsonl': no such file"):
        env_for("/nope.jsonl")
    for bad, message in [({"train_path": None}, "env.train_path=None: env.name=dataset needs a JSONL file"),
                         ({"prompt_template": "Q:"}, "env.prompt_template='Q:': must contain {prompt}"),
                         ({"reward": "nope"}, "env.reward='nope': must be math, exact or package.module:function"),
                         ({"reward_range": [1.0, 0.0]}, r"env.reward_range=\[1.0, 0.0\]: must be \[low, high\]")]:
        cfg = EnvConfig(**{"name": "dataset", "train_path": path, **bad})
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            cfg.validate()
    with pytest.raises(ConfigError, match=r"env.reward='no_such_module:f': cannot load it \(ModuleNotFoundError"):
        env_for(path, num_eval=1, reward="no_such_module:f")
    with pytest.raises(ConfigError, match=r"env.reward='dataset_rewards:NOT_A_FUNCTION': int is not callable"):
        env_for(path, num_eval=1, reward="dataset_rewards:NOT_A_FUNCTION")


@pytest.mark.parametrize("text, committed", [
    ("so the total is \\boxed{\\frac{3}{4}} dollars", "\\frac{3}{4}"),
    ("5 * 2 = 10\n#### 1,234", "1,234"),
    ("first 3, then 5", "5"),
    ("no number here", None),
    ("\\boxed{7} but maybe #### 8", "7"),  # a boxed answer wins over a later marker
])
def test_the_committed_answer_is_extracted(text, committed):
    assert extract_answer(text) == committed


def test_math_equivalence_is_exact_on_numbers_and_normalised_on_text():
    assert equivalent("0.75", "3/4") and equivalent("\\frac{3}{4}", "0.75") and equivalent("$18.00", "18")
    assert equivalent("1,234", "1234") and equivalent("50%", "50") and equivalent("x = 2", "X  =  2")
    assert not equivalent("1,2", "12") and not equivalent("0.7500001", "3/4") and not equivalent(None, "1")


def test_math_reward_pays_only_the_committed_answer(tmp_path):
    """A policy that lists candidates is paid for the one it commits to (the last), never for
    the right number somewhere in its text."""
    env = env_for(write_jsonl(tmp_path / "d.jsonl", [{"question": "6*7=", "label": "42"}] * 3), num_eval=1,
                  tokenizer="gpt2")
    eos = env.tokenizer.eos_id

    def score(text):
        return env.score("42", env.tokenizer.encode(text) + [eos])

    assert score("6*7 = 42").reward == 1.0 and score("#### 42.0").reward == 1.0
    assert score("maybe 42 or 41 or 40").reward == 0.0  # the last number is its answer
    assert score("42 42 42 #### 41").reward == 0.0
    assert score("\\boxed{41} #### 42").reward == 0.0
    assert score("the answer").info["extracted"] is None


@pytest.mark.parametrize("thinking", [False, True])
def test_reasoning_models_are_paid_for_the_answer_after_their_reasoning_only(tmp_path, thinking):
    """A tokenizer with <think> / </think> tokens (DeepSeek's, in DeepSeek-V3.1's turn format):
    the math and exact verifiers score what follows the last </think>; an answer written only
    inside the reasoning, or a response cut before the reasoning ended, earns nothing, whether
    the response opened the reasoning itself or the template did (thinking on: the prompt ends in
    <think>). env.reasoning=none scores the whole text; a tokenizer without the tokens is unchanged."""
    from test_hf_tokenizer import tokenizer_dir

    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "6*7=", "label": "42"}] * 3)
    kwargs = dict(num_eval=1, tokenizer="hf", tokenizer_path=tokenizer_dir(tmp_path / "tok"),
                  chat_template_kwargs={"thinking": thinking})
    env = env_for(data, **kwargs)

    def score(text, on=env, answer="42"):
        return on.score(answer, on.tokenizer.encode_template_text(text) + [on.tokenizer.eos_id])

    assert score("<think>6*7 is 42, maybe 41</think>The answer is \\boxed{42}").reward == 1.0
    assert score("<think>it is \\boxed{42}</think>\\boxed{41}").reward == 0.0  # the committed answer is 41
    assert score("<think>it is \\boxed{42}</think>I am not sure").reward == 0.0  # committed to nothing
    cut = score("<think>so far: \\boxed{42}")  # the budget ran out while thinking
    assert cut.reward == 0.0 and cut.info["reason"] == "the reasoning never ended (no </think>)"
    assert score("\\boxed{42}</think>").reward == 0.0  # nothing after the reasoning
    assert score("<think>a</think>\\boxed{42}<think>or not").reward == 0.0  # reasoning again, never ended
    # no reasoning at all: paid when the template turned thinking off, not when it opened it
    assert score("\\boxed{42}").reward == (0.0 if thinking else 1.0)
    exact = env_for(data, reward="exact", **kwargs)
    assert score("<think>hm</think>42", exact).reward == 1.0 and score("<think>42", exact).reward == 0.0
    whole = env_for(data, reasoning="none", **kwargs)
    assert score("<think>\\boxed{42}", whole).reward == 1.0
    with pytest.raises(ConfigError, match=r"env.reasoning=think: the tokenizer \(gpt2\) has no single <think> / </think>"):
        env_for(data, num_eval=1, tokenizer="gpt2", reasoning="think")
    plain = env_for(data, num_eval=1, tokenizer="gpt2")
    assert plain.score("42", plain.tokenizer.encode("<think>\\boxed{42}") + [plain.tokenizer.eos_id]).reward == 1.0
    with pytest.raises(ConfigError, match=r"env.reasoning='maybe': must be auto, think, harmony or none"):
        EnvConfig(name="dataset", train_path=data, reasoning="maybe").validate()


def test_gpt_oss_is_paid_for_its_final_channel_only(tmp_path):
    """GPT-OSS's harmony format (envs/reasoning.py): the verifiers score the response's last
    message when it is on the final channel, found by token ids; an answer written on the
    analysis channel, a response cut before its final message, or one that went back to
    analysing after it, earns nothing. auto picks the split from the tokenizer's tokens."""
    from qwen_format import harmony_tokenizer_dir

    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "6*7=", "label": "42"}] * 3)
    kwargs = dict(num_eval=1, tokenizer="hf", tokenizer_path=harmony_tokenizer_dir(tmp_path / "tok"))
    env = env_for(data, **kwargs)
    assert env.tokenizer.decode_turns(env._prompt_ids(env._train[0])).endswith("<|end|><|start|>assistant")

    def score(text, on=env, answer="42"):
        return on.score(answer, on.tokenizer.encode_template_text(text))

    analysis = "<|channel|>analysis<|message|>6*7 is \\boxed{41}? no, 42<|end|><|start|>assistant"
    assert score(f"{analysis}<|channel|>final<|message|>The answer is \\boxed{{42}}<|return|>").reward == 1.0
    assert score("<|channel|>final<|message|>\\boxed{42}<|return|>").reward == 1.0  # no analysis: fine
    assert score(f"{analysis}<|channel|>final<|message|>\\boxed{{41}}<|return|>").reward == 0.0  # committed to 41
    hidden = score("<|channel|>analysis<|message|>it is \\boxed{42}<|end|>")  # only while analysing
    assert hidden.reward == 0.0 and hidden.info["reason"].startswith("the response's last message is not on the final")
    assert score(f"{analysis}<|channel|>final").reward == 0.0  # cut inside the final header
    assert score("<|channel|>final<|message|>\\boxed{42}<|end|><|start|>assistant<|channel|>analysis<|message|>or"
                 ).reward == 0.0  # analysing again after its answer: not committed
    assert score("<|channel|>final<|message|>\\boxed{42}<|end|><|start|>assistant<|message|>or not").reward == 0.0
    assert score("<|channel|>commentary<|message|>\\boxed{42}<|return|>").reward == 0.0
    # the markers spelled in plain text are not the tokens: no final message at all
    spelled = env.tokenizer.encode("<|channel|>final<|message|>\\boxed{42}")
    assert env.score("42", spelled).reward == 0.0
    exact = env_for(data, reward="exact", **kwargs)
    assert score(f"{analysis}<|channel|>final<|message|>42<|return|>", exact).reward == 1.0
    assert score("<|channel|>analysis<|message|>42<|end|>", exact).reward == 0.0
    assert score("<|channel|>analysis<|message|>\\boxed{42}", env_for(data, reasoning="none", **kwargs)).reward == 1.0
    assert score("<|channel|>final<|message|>\\boxed{42}<|return|>", env_for(data, reasoning="harmony", **kwargs)
                 ).reward == 1.0
    with pytest.raises(ConfigError, match=r"env.reasoning=harmony: the tokenizer \(gpt2\) has no single "
                                          r"<\|channel\|> / <\|message\|> tokens"):
        env_for(data, num_eval=1, tokenizer="gpt2", reasoning="harmony")
    with pytest.raises(ConfigError, match=r"env.reasoning='think': applies to the math and exact verifiers"):
        EnvConfig(name="dataset", train_path=data, reasoning="think", reward="m:f").validate()
    with pytest.raises(ConfigError, match=r"env.reasoning='none': is for env.name=dataset"):
        EnvConfig(name="arithmetic", reasoning="none").validate()


def test_exact_and_custom_rewards_with_their_failures_bounded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", additions(6))
    exact = env_for(path, num_eval=1, reward="exact", tokenizer="gpt2")
    ids = exact.tokenizer.encode
    assert exact.score("17", ids(" 17 ")).reward == 1.0 and exact.score("17", ids("#### 17")).reward == 0.0
    custom = env_for(path, num_eval=1, reward="dataset_rewards:mentions_label", tokenizer="gpt2")
    # a custom verifier's label travels with the task as JSON: the record's label "17"
    seventeen = next(r.answer for r in custom._train + custom._eval if json.loads(r.answer)["label"] == "17")
    result = custom.score(seventeen, ids("it is 17"))
    assert result.reward == 1.0 and result.info["checked"] == "substring"
    # what a record can carry: anything but plain scalars becomes a short repr
    assert result.info["objects"] == "{1, 2}" and result.info["big"] == repr(2**70) and result.info["ended"] is False
    # a verifier that returns junk or raises is that sample's 0 with the reason, never a crash
    for name, reason in [("forged", "invalid reward 100.0"), ("broken", "RuntimeError: verifier bug")]:
        env = env_for(path, num_eval=1, reward=f"dataset_rewards:{name}", tokenizer="gpt2")
        results = score_group_with_timeout(env, [seventeen, seventeen], [ids("9"), ids("1")], timeout_s=2.0)
        assert reason in results[0].info["reason"] and results[0].reward == 0.0
        # the group's other sample keeps its own verdict (forged: a valid 0.0; broken: its own error)
        assert results[1].reward == 0.0 and ("reason" in results[1].info) == (name == "broken")


def test_a_custom_verifier_gets_structured_labels_and_the_records_extra_fields(tmp_path):
    """verl-style records: the label is an object and other fields (data_source, tests) ride
    along. A verifier with a third parameter gets env.extra_keys's fields; labels that are objects
    reach it as objects, text labels as text, through the task's JSON answer. Asking for extra
    fields from a two-parameter verifier, or an extra key no record has, is a config error; so is
    an object label with a built-in reward, and a warm-up with no text target."""
    from rlpost.cli_config import load_config
    from rlpost.run import Run

    rows = [{"question": f"{a}+1=", "label": {"sum": a + 1, "alts": [str(a + 1)]}, "source": "toy", "level": a % 3}
            for a in range(10, 20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    env = env_for(path, num_eval=2, reward="dataset_rewards:structured", extra_keys=["source", "level"])
    task = env.train_task(0, seed=0, group_size=2, sampling=SamplingParams(max_new_tokens=4))
    a = int(env.tokenizer.decode(task.prompt_ids).split("+")[0])
    result = env.score(task.answer, env.tokenizer.encode(str(a + 1)) + [env.tokenizer.eos_id])
    assert result.reward == 1.0 and result.info["seen"] == f"dict/toy/{a % 3}", result
    assert env.score(task.answer, env.tokenizer.encode("0")).reward == 0.0
    # a task written by an older rlpost (its answer the plain label), resumed: still the label
    assert env.score("17", env.tokenizer.encode("17") + [env.tokenizer.eos_id]).info["seen"] == "str/None/None"
    text_labels = env_for(write_jsonl(tmp_path / "t.jsonl", additions(10)), num_eval=2,
                          reward="dataset_rewards:structured", extra_keys=["solution"])
    t = text_labels.train_task(0, seed=0, group_size=2, sampling=SamplingParams(max_new_tokens=4))
    assert text_labels.score(t.answer, []).info["seen"].startswith("str/")
    # the character vocabulary covers the label's text, not the JSON the task carries it in
    assert not set('{}":') & set(text_labels.tokenizer.alphabet), text_labels.tokenizer.alphabet
    for kw, message in [({"reward": "dataset_rewards:half", "extra_keys": ["source"]},
                         r"env.extra_keys=\['source'\]: env.reward='dataset_rewards:half' takes \(response, label\)"),
                        ({"reward": "dataset_rewards:structured", "extra_keys": ["sorce"]},
                         r"env.extra_keys: 'sorce' is in no record of env.train_path="),
                        ({"reward": "math"}, r"record 1 has no usable env.answer_key='label' .*needs a custom verifier")]:
        with pytest.raises(ConfigError, match=message):
            env_for(path, num_eval=2, **kw)
    with pytest.raises(ConfigError, match=r"env.extra_keys=\['source'\]: is for env.name=dataset with a custom verifier"):
        EnvConfig(name="dataset", train_path=path, extra_keys=["source"]).validate()
    args = ["env=dataset", f"env.train_path={path}", "env.prompt_key=question", "env.answer_key=label",
            "env.num_eval=2", "env.reward=dataset_rewards:structured", f"run_dir={tmp_path}/r"]
    with pytest.raises(ConfigError, match=r"warmup.steps=\d+: the training records' labels are lists or objects"):
        Run(load_config(args))
    assert Run(load_config(args + ["warmup.steps=0"])).env.missing_sft


def test_extra_eval_sets_are_named_tasks_of_the_same_evaluation(tmp_path):
    """env.eval_sets: named benchmarks beside the main held-out set, in the same eval round (one
    stream), told apart by id and meta; they need no warm-up key; bad names are config errors."""
    data = write_jsonl(tmp_path / "d.jsonl", additions(20))
    bench = write_jsonl(tmp_path / "b.jsonl", [{"question": f"{a}+1=", "label": a + 1} for a in range(3)])
    env = env_for(data, sft_key="solution", eval_sets={"hard": bench})
    tasks = env.eval_tasks("step10", min_version=7)
    main = [t for t in tasks if "eval_set" not in t.meta]
    extra = [t for t in tasks if t.meta.get("eval_set") == "hard"]
    assert len(main) == 5 and [t.task_id for t in extra] == ["eval-step10-hard-0", "eval-step10-hard-1", "eval-step10-hard-2"]
    assert {t.purpose for t in tasks} == {"eval:step10"} and {t.min_version for t in tasks} == {7}
    assert env.tokenizer.decode(extra[1].prompt_ids) == "1+1=" and extra[1].answer == "2"
    for sets, message in [({"accuracy": bench}, r"env.eval_sets='accuracy': set names are letters"),
                          ({"a b": bench}, r"env.eval_sets='a b'"),
                          ({"x": str(tmp_path / "none.jsonl")}, r"env.eval_sets.x=.*none.jsonl': no such file")]:
        with pytest.raises(ConfigError, match=message):
            env_for(data, eval_sets=sets)
    with pytest.raises(ConfigError, match=r"env.eval_sets=.*is for env.name=dataset"):
        EnvConfig(eval_sets={"x": bench}).validate()


def test_a_jsonl_dataset_on_a_checkpoint_with_its_tokenizer_and_a_custom_verifier_trains_end_to_end(tmp_path):
    """The whole loop on env=dataset as a user runs it on a real checkpoint: model.path holds the
    weights and the tokenizer files (DeepSeek-V4's, with a chat template), so env.tokenizer=auto is hf, the
    user's verifier imported by name in every worker (separate processes), an extra eval set.
    Every reward is the verifier's 0.5; the eval answers show each prompt as the template
    rendered it; final/ carries the tokenizer, so it loads as a whole checkpoint."""
    import os

    import torch
    from transformers import AutoTokenizer

    from rlpost.config import ModelConfig
    from rlpost.metrics import read_metrics
    from rlpost.modeling import Qwen3MoeForCausalLM, save_pretrained

    from test_e2e import run_cli
    from test_hf_tokenizer import tokenizer_dir

    checkpoint = tokenizer_dir(tmp_path / "ckpt")
    model_cfg = ModelConfig(vocab_size=129280, max_seq_len=64)
    torch.manual_seed(0)
    save_pretrained(Qwen3MoeForCausalLM(model_cfg).canonical_state_dict(), model_cfg, checkpoint)
    data = write_jsonl(tmp_path / "d.jsonl", additions(80))
    bench = write_jsonl(tmp_path / "b.jsonl", [{"question": f"{a}+1=", "label": a + 1} for a in range(3)])
    run_dir = tmp_path / "run"
    # the user's verifier module must be importable in every worker: here, through PYTHONPATH
    here = os.path.dirname(os.path.abspath(__file__))
    pythonpath = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    run_cli(["experiment=toy_moe_local", "env=dataset", f"env.train_path={data}", "env.prompt_key=question",
             "env.answer_key=label", "env.num_eval=8", "env.reward=dataset_rewards:half", f"run_dir={run_dir}",
             f"model.path={checkpoint}", "warmup.steps=3", "trainer.steps=2",  # env.tokenizer=auto: hf
             "rollout.batch_prompts=4", "rollout.max_new_tokens=8", "logger.progress=false",
             f"+env.eval_sets.bench={bench}"], timeout=300, extra_env={"PYTHONPATH": pythonpath})
    rows = read_metrics(str(run_dir / "metrics.jsonl"))
    assert [r["reward/mean"] for r in rows if "reward/mean" in r] == [0.5, 0.5]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_accuracy_before"] == summary["eval_accuracy_after"] == 0.5
    # the extra eval set: its own metric, summary entry and answers file, at every evaluation
    assert [e["bench/accuracy"] for e in summary["evals"]] == [0.5, 0.5]
    assert [r["eval/bench/accuracy"] for r in rows if "eval/accuracy" in r] == [0.5, 0.5]
    for tag in ("before", "after"):
        answers = [json.loads(line) for line in (run_dir / "evals" / f"{tag}.jsonl").read_text().splitlines()]
        assert len(answers) == 8 and all(re.fullmatch(r"<｜User｜>\d+\+\d=<｜Assistant｜></think>", a["prompt"])
                                         for a in answers), answers[0]
        bench_rows = [json.loads(line) for line in (run_dir / "evals" / f"{tag}.bench.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in bench_rows] == [f"<｜User｜>{a}+1=<｜Assistant｜></think>" for a in range(3)]
    # the tokenizer: resolved from model.path into config.yaml, and carried into final/
    assert f"tokenizer: hf\n  tokenizer_path: {checkpoint}\n" in (run_dir / "config.yaml").read_text()
    final = AutoTokenizer.from_pretrained(str(run_dir / "final"), local_files_only=True)
    source = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    chat = [{"role": "user", "content": "12+5="}]
    assert (final.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == source.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert json.loads((run_dir / "final" / "config.json").read_text())["vocab_size"] == 129280


def test_a_training_prompt_too_long_for_the_model_is_refused_at_start_up(tmp_path):
    from rlpost.cli_config import load_config
    from rlpost.run import Run

    rows = additions(10) + [{"question": "1+" * 40 + "1=", "label": 41}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_config(["env=dataset", f"env.train_path={data}", "env.prompt_key=question", "env.answer_key=label",
                       "env.num_eval=2", "model.max_seq_len=64", "rollout.max_new_tokens=8", f"run_dir={tmp_path}/r"])
    with pytest.raises(ConfigError, match=r"model.max_seq_len=64: the training prompt at .*d.jsonl:11 needs 83 tokens "
                                          r"\+ rollout.max_new_tokens=8"):
        Run(cfg)


def test_long_prompts_are_dropped_and_counted_when_asked_and_refused_otherwise(tmp_path, capsys):
    """env.filter_long_prompts: records whose prompt leaves no room for the completion budget
    go (training and eval sets alike), the rest keep their order and seeded stream; without it
    the run is refused at the first such record, as before."""
    from rlpost.cli_config import load_config
    from rlpost.run import Run

    long = [{"question": "1+" * 40 + "1=", "label": 41}]
    data = write_jsonl(tmp_path / "d.jsonl", additions(10)[:5] + long + additions(10)[5:] + long)
    evals = write_jsonl(tmp_path / "e.jsonl", long + additions(3))
    bench = write_jsonl(tmp_path / "b.jsonl", additions(2) + long)
    args = ["env=dataset", f"env.train_path={data}", f"env.eval_path={evals}", f"+env.eval_sets.bench={bench}",
            "env.prompt_key=question", "env.answer_key=label", "model.max_seq_len=64",
            "rollout.max_new_tokens=8", f"run_dir={tmp_path}/r"]
    with pytest.raises(ConfigError, match=r"the training prompt at .*d.jsonl:6 needs 83 tokens"):
        Run(load_config(args))
    run = Run(load_config(args + ["env.filter_long_prompts=true"]))
    assert run.dropped_prompts == {"train": 2, "eval": 1, "bench": 1}
    assert "dropped {'train': 2, 'eval': 1, 'bench': 1} prompts" in capsys.readouterr().out
    env = run.env
    assert [r.where.rsplit(":", 1)[1] for r in env._train] == ["1", "2", "3", "4", "5", "7", "8", "9", "10", "11"]
    assert len(env.eval_tasks("x", 0)) == 3 + 2 and env.longest_train_prompt[0] < 64 - 8
    assert {env.train_record(i, seed=0).where for i in range(10)} == {r.where for r in env._train}
    only_long = write_jsonl(tmp_path / "l.jsonl", long * 3)
    with pytest.raises(ConfigError, match=r"env.filter_long_prompts=true: every eval prompt is longer"):
        Run(load_config(args[:2] + [f"env.eval_path={only_long}"] + args[4:] + ["env.filter_long_prompts=true"]))


def test_the_toy_dataset_experiment_starts_on_the_data_its_script_writes(tmp_path):
    """experiment=toy_moe_dataset + scripts/make_addition_dataset.py (README "Your own data"):
    the config accepts the written files (budget, sequence length, keys), held-out prompts are
    not in the training file, and the reference solutions score 1 where the teacher was right."""
    import os
    import subprocess
    import sys

    from rlpost.cli_config import load_config
    from rlpost.run import Run

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "scripts", "make_addition_dataset.py"), str(tmp_path / "d")],
                   check=True, capture_output=True)
    cfg = load_config(["experiment=toy_moe_dataset", f"env.train_path={tmp_path}/d/train.jsonl",
                       f"env.eval_path={tmp_path}/d/test.jsonl", f"run_dir={tmp_path}/run"])
    env = Run(cfg).env
    assert len(env._train) == 9800 and len(env._eval) == 200
    assert not {r.prompt for r in env._eval} & {r.prompt for r in env._train}
    scores = [env.score(r.answer, env.tokenizer.encode(r.sft_target) + [env.tokenizer.eos_id]).reward for r in env._train]
    # the flawed teacher is right on the ~30% of sums without a carry and on 20% of the others
    assert 0.40 < sum(scores) / len(scores) < 0.50
