"""A real DeepSpeed trainer rank and a real rollout worker, in-process, talking through Redis."""

import socket

import numpy as np
import pytest
import torch

from rlpost.records import SamplingParams, unpack_entry
from rlpost.trainer.batch import collate
from rlpost.trainer.losses import token_logprobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rig(small_cfg, redis_url, tmp_path_factory):
    from rlpost.buffer import RedisBuffer, connect
    from rlpost.rollout.worker import RolloutWorker
    from rlpost.trainer.actor import TrainerRank
    from rlpost.trainer.ds_engine import DistEnv

    run = "trainertest"
    buf = RedisBuffer(connect(redis_url), run)
    buf.reset()
    buf.ensure_groups()
    run_dir = str(tmp_path_factory.mktemp("run"))
    trainer = TrainerRank(small_cfg, DistEnv(0, 1, "127.0.0.1", free_port()), redis_url, run, run_dir)
    worker = RolloutWorker(small_cfg, 0, redis_url, run)
    yield trainer, worker, buf
    buf.reset()


def params(trainer):
    return {k: v.clone() for k, v in trainer.canonical_state().items()}


def test_engine_logprobs_match_the_deepspeed_model(rig):
    """Same weights, same tokens: behaviour logprobs from the engine equal the trainer's."""
    trainer, worker, buf = rig
    trainer.publish()
    worker.maybe_update_weights()
    env = worker.env
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6)
    tasks = [env.train_task(i, 0, 3, sampling) for i in range(4)]
    groups = worker.generate_groups(tasks)
    trajs = [t for g in groups for t in g]
    batch = collate(trajs, torch.zeros(len(trajs)))
    with torch.no_grad():
        logits = trainer.engine(batch.input_ids).logits
    trainer_logp = token_logprobs(logits[:, :-1], batch.targets)
    m = batch.mask.bool()
    assert m.sum() > 0
    torch.testing.assert_close(trainer_logp[m], batch.behav_logp[m], atol=2e-5, rtol=0)


def test_train_step_changes_weights_and_publishes_a_new_version(rig):
    trainer, worker, buf = rig
    trainer.publish()
    v0 = buf.current_version().version
    worker.maybe_update_weights()
    env = worker.env
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6)
    # rewards must differ inside groups for GRPO to have a gradient: use a large group
    tasks = [env.train_task(100 + i, 0, 4, sampling) for i in range(trainer.cfg.rollout.batch_prompts)]
    buf.put_tasks(tasks)
    deliveries = buf.read_tasks("w-test", count=len(tasks), block_ms=200)
    groups = worker.generate_groups([d.item for d in deliveries])
    for g in groups:  # hand-set rewards so every group has signal
        for k, t in enumerate(g):
            t.reward = float(k % 2)
    for d, g in zip(deliveries, groups):
        buf.finish_task(d, d.item, g)
    before = params(trainer)
    metrics = trainer.train_step(step=1, timeout_s=30)
    after = params(trainer)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("mlp.experts" in k for k in changed) and any("self_attn" in k for k in changed)
    assert metrics["weights/version"] == v0 + 1
    assert buf.current_version().version == v0 + 1
    assert metrics["train/tokens"] > 0 and np.isfinite(metrics["train/loss"])
    assert metrics["weights/version_lag_max"] == 0
    # every token is on-policy: the train-inference mismatch is logged and tiny for the native engine
    assert metrics["mismatch/tokens"] == metrics["train/tokens"]
    assert 0 <= metrics["mismatch/logprob_abs_mean"] <= metrics["mismatch/logprob_abs_max"] < 1e-4
    # the native engine reports its routing: the DeepSpeed policy routes every token the same way
    assert metrics["mismatch/routing_tokens"] == metrics["train/tokens"]
    assert metrics["mismatch/routing_token_frac"] == 0.0 and metrics["mismatch/routing_layer_frac"] == 0.0
    # the groups were acked and recorded: nothing left for the trainer
    assert buf.depth()["complete_pending"] == 0
    assert all(buf.already_trained([t.traj_id for g in groups for t in g]))
    # the worker picks the new version up at its next chunk boundary and tags tokens with it
    assert worker.maybe_update_weights() and worker.engine.version == v0 + 1
    new = worker.generate_groups([env.train_task(999, 0, 2, sampling)])
    assert set(new[0][0].versions.tolist()) == {v0 + 1}


@pytest.mark.parametrize("level,agg,estimator,first_task", [
    ("token", "token_mean", "grpo", 1100), ("sequence", "token_mean", "grpo", 1110),
    ("token", "seq_sum_norm", "grpo", 1120), ("token", "token_mean", "rloo", 1130),
    ("token", "token_mean", "reinforce_pp_baseline", 1140)])
def test_the_step_trains_the_configured_ratio_level_and_aggregation(rig, level, agg, estimator, first_task):
    """The step hands trainer.advantage (with each sample's trained tokens), trainer.ratio_level,
    trainer.loss_agg and the response budget to the loss:
    with one token per sample made e times likelier than when it was sampled (its behaviour
    logprob lowered by 1), the importance weights and the policy-gradient loss (ratio exactly 1
    on a single update) are what each setting predicts by hand, through a packed batch."""
    from rlpost.trainer.losses import advantages

    trainer, worker, buf = rig
    trainer.publish()
    worker.maybe_update_weights()
    n = trainer.cfg.rollout.batch_prompts
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6)
    tasks = [worker.env.train_task(first_task + i, 0, 4, sampling) for i in range(n)]  # new ids: untrained
    buf.put_tasks(tasks)
    deliveries = buf.read_tasks("w-test", count=n, block_ms=200)
    groups = worker.generate_groups([d.item for d in deliveries])
    for g in groups:
        for k, t in enumerate(g):
            t.reward = float(k % 2)
            t.logprobs[0] -= 1.0
    for d, g in zip(deliveries, groups):
        buf.finish_task(d, d.item, g)
    cfg = trainer.cfg.trainer
    saved = cfg.ratio_level, cfg.loss_agg, cfg.advantage
    cfg.ratio_level, cfg.loss_agg, cfg.advantage = level, agg, estimator
    try:
        metrics = trainer.train_step(step=1, timeout_s=30)
    finally:
        cfg.ratio_level, cfg.loss_agg, cfg.advantage = saved
    lengths = np.array([len(t) for g in groups for t in g], dtype=float)
    rewards = torch.tensor([[t.reward for t in g] for g in groups])
    adv = advantages(rewards, estimator, token_counts=torch.tensor(lengths).reshape(rewards.shape)).reshape(-1).numpy()
    if level == "token":  # the raised token capped at tis_cap, the others 1
        weight_sums = lengths - 1 + min(np.e, cfg.tis_cap)
    else:  # GSPO: the sequence's geometric mean exp(1/len) on each of its tokens
        weight_sums = lengths * np.minimum(np.exp(1 / lengths), cfg.tis_cap)
    assert metrics["train/is_weight_mean"] == pytest.approx(weight_sums.sum() / lengths.sum(), abs=1e-3)
    norm = lengths.sum() if agg == "token_mean" else len(lengths) * trainer.cfg.rollout.max_new_tokens
    assert metrics["train/pg_loss"] == pytest.approx(float((-adv * weight_sums).sum() / norm), abs=1e-3)
    assert metrics["advantage/max"] == pytest.approx(adv.max(), abs=1e-5)
    assert metrics["advantage/abs_mean"] == pytest.approx(np.abs(adv).mean(), abs=1e-5)


def test_trainer_skips_trained_duplicates_and_sends_stale_groups_back(rig):
    """Collecting a batch: a group already trained (redelivered after a crash) is acked away, a
    group older than max_staleness goes back as a fresh task; only the rest is trained."""
    trainer, worker, buf = rig
    trainer.publish()
    worker.maybe_update_weights()
    n = trainer.cfg.rollout.batch_prompts
    sampling = SamplingParams(temperature=1.0, max_new_tokens=4)
    tasks = [worker.env.train_task(300 + i, 0, 2, sampling) for i in range(n + 2)]
    buf.put_tasks(tasks)
    deliveries = buf.read_tasks("w-test", count=len(tasks), block_ms=200)
    groups = worker.generate_groups([d.item for d in deliveries])
    buf.client.sadd(buf.key("trained"), *[t.traj_id for t in groups[0]])  # trained before
    for t in groups[1]:
        t.versions[:] = trainer.version - trainer.cfg.rollout.max_staleness - 1  # too old
    for d, g in zip(deliveries, groups):
        buf.finish_task(d, d.item, g)
    saved = trainer.cfg.mode
    trainer.cfg.mode = "async"
    try:
        metrics = trainer.train_step(step=1, timeout_s=30)
    finally:
        trainer.cfg.mode = saved
    assert metrics["train/samples"] == 2 * n and metrics["staleness/restarted_groups"] == 1
    assert buf.depth()["complete"] == 0
    requeued = buf.read_tasks("w-test", count=10, block_ms=200)
    assert [d.item.task_id for d in requeued] == [tasks[1].task_id]  # a fresh task again
    buf.finish_task(requeued[0], requeued[0].item, worker.generate_groups([requeued[0].item])[0])
    buf.client.delete(buf.key("complete"))
    buf.ensure_groups()


def test_worker_swaps_weights_mid_generation_and_tags_tokens(rig):
    """A publish between chunks: tokens before it carry the old version, tokens after the new."""
    trainer, worker, buf = rig
    trainer.publish()
    worker.maybe_update_weights()
    v_old = worker.engine.version
    env = worker.env
    worker.engine.cfg.chunk_tokens = 2
    worker.engine.eos_id = -1  # run every sample to its budget so the swap lands mid-sequence
    calls = {"n": 0}
    real_poll = worker.buffer.poll

    def publish_during_generation():
        calls["n"] += 1
        if calls["n"] == 1:  # the trainer publishes while the first chunk is being generated
            trainer.version += 1
            trainer.publish()
        return real_poll()

    worker.buffer.poll = publish_during_generation
    try:
        group = worker.generate_groups([env.train_task(500, 0, 2, SamplingParams(1.0, 1.0, 6))])[0]
    finally:
        worker.buffer.poll = real_poll
        worker.engine.cfg.chunk_tokens = 8
        worker.engine.eos_id = env.tokenizer.eos_id
    for traj in group:
        assert traj.versions.tolist() == [v_old] * 2 + [v_old + 1] * 4
        assert traj.num_resumes == 0 and len(traj) == 6  # an in-worker swap is not a buffer resume


def april_group_with_a_publish_after_the_first_chunk(trainer, worker, versions_ahead, task_id):
    """Generate one 6-token group in april mode (2-token chunks, no EOS) while the trainer
    publishes ``versions_ahead`` newer weights during the first chunk. Returns (group, v_old)."""
    trainer.publish()
    worker.maybe_update_weights()
    v_old = worker.engine.version
    saved = (worker.cfg.mode, worker.engine.cfg.chunk_tokens, worker.engine.eos_id)
    worker.cfg.mode, worker.engine.cfg.chunk_tokens, worker.engine.eos_id = "april", 2, -1
    calls = {"n": 0}
    real_poll = worker.buffer.poll

    def publish_during_generation():
        calls["n"] += 1
        if calls["n"] == 1:
            trainer.version += versions_ahead
            trainer.publish()
        return real_poll()

    worker.buffer.poll = publish_during_generation
    try:
        group = worker.generate_groups([worker.env.train_task(task_id, 0, 2, SamplingParams(1.0, 1.0, 6))])[0]
    finally:
        worker.buffer.poll = real_poll
        worker.cfg.mode, worker.engine.cfg.chunk_tokens, worker.engine.eos_id = saved
    return group, v_old


def test_april_prefetches_published_weights_and_swaps_only_at_the_round_cut(rig, monkeypatch):
    """APRIL: weights published mid-round are fetched in the background and not swapped in
    mid-sequence; the swap at the round cut uses the prefetched tensors."""
    trainer, worker, buf = rig
    group, v_old = april_group_with_a_publish_after_the_first_chunk(trainer, worker, 1, 520)
    assert all(traj.versions.tolist() == [v_old] * 6 for traj in group)
    assert worker._prefetch is not None and worker._prefetch[0] == v_old + 1

    def no_foreground_fetch(wv):
        raise AssertionError("the round cut must use the prefetched weights")

    monkeypatch.setattr("rlpost.rollout.worker.fetch_weights", no_foreground_fetch)
    assert worker.maybe_update_weights() and worker.engine.version == v_old + 1
    assert worker._prefetch is None


def test_april_swaps_mid_round_when_its_tokens_could_no_longer_be_trained(rig):
    """APRIL defers swaps to the round cut, but a publish that leaves the engine more than
    ``rollout.max_staleness`` versions behind swaps at the next chunk: tokens made under the old
    weights would be refused by every later step, and a trainer waiting for trainable groups
    never cuts a round (the livelock seen with vLLM in CI)."""
    trainer, worker, buf = rig
    ahead = worker.cfg.rollout.max_staleness + 1  # several steps trained while this worker generated
    group, v_old = april_group_with_a_publish_after_the_first_chunk(trainer, worker, ahead, 521)
    assert worker.engine.version == v_old + ahead
    assert all(traj.versions.tolist() == [v_old] * 2 + [v_old + ahead] * 4 for traj in group)


def test_sft_step_lowers_the_loss(rig):
    trainer, worker, _ = rig
    examples = [worker.env.sft_example(i, seed=5) for i in range(16)]
    first = trainer.sft_step(examples, lr=3e-3)["sft/loss"]
    for _ in range(5):
        last = trainer.sft_step(examples, lr=3e-3)["sft/loss"]
    assert last < first


@pytest.mark.parametrize("stage", [0, 2])
def test_other_zero_stages_train(rig, stage):
    """ZeRO-0 and ZeRO-2 engines (with MoE param groups) take a step and change the weights."""
    import copy

    from rlpost.trainer.ds_engine import build_engine
    from rlpost.trainer.policy import build_policy

    trainer, worker, _ = rig
    cfg = copy.deepcopy(trainer.cfg.trainer)
    cfg.zero_stage = stage
    model = build_policy(trainer.cfg.model)
    engine, precision, accum = build_engine(model, cfg, 1e-2, 8, "cpu", 1)
    assert precision == "fp32" and engine.zero_optimization_stage() == stage
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = [worker.env.sft_example(i, seed=1) for i in range(8)]
    from rlpost.trainer.batch import sft_batch

    ids, targets, mask = sft_batch(examples)
    logits, aux, _, _ = engine(ids)
    loss = -(token_logprobs(logits[:, :-1], targets) * mask).sum() / mask.sum() + 0.01 * aux
    engine.backward(loss)
    engine.step()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "deepspeed_experts" in k)


def test_loaded_weights_survive_the_next_optimizer_step(rig):
    """ZeRO keeps fp32 master partitions: a load must refresh them, or the next step reverts it."""
    trainer, worker, _ = rig
    loaded = {k: v + 0.05 for k, v in trainer.canonical_state().items()}
    trainer.load_state(loaded)
    trainer.reset_optimizer_state()
    trainer.sft_step([worker.env.sft_example(i, seed=2) for i in range(8)], lr=1e-7)
    after = trainer.canonical_state()
    for name, value in loaded.items():
        assert torch.allclose(after[name], value, atol=1e-5), name


def test_april_round_cut_parks_partials_and_resumes_them_with_new_versions(rig):
    """A round is cut mid-generation: every unfinished group is parked (no prompt lost), resumed
    first under the newer weights with the version switching mid-sequence, and the loss sees
    exactly those per-token versions."""
    trainer, worker, buf = rig
    env = worker.env
    trainer.publish()
    worker.maybe_update_weights()
    v_old = worker.engine.version
    saved = (worker.cfg.mode, trainer.cfg.mode, worker.engine.cfg.chunk_tokens, worker.engine.eos_id)
    worker.cfg.mode = trainer.cfg.mode = "april"
    worker.engine.cfg.chunk_tokens = 2
    worker.engine.eos_id = -1  # every sample runs to its 6-token budget
    n = trainer.cfg.rollout.batch_prompts
    tasks = [env.train_task(700 + i, 0, 2, SamplingParams(1.0, 1.0, 6)) for i in range(n)]
    real_poll = worker.buffer.poll
    calls = {"n": 0}

    def trainer_has_its_batch():
        calls["n"] += 1
        if calls["n"] == 1:
            buf.advance_round()
        return real_poll()

    try:
        buf.put_tasks(tasks)
        worker.buffer.poll = trainer_has_its_batch
        worker.serve(buf.read_tasks(worker.name, count=n, block_ms=200))
        worker.buffer.poll = real_poll
        depth = buf.depth()
        assert depth["partials"] == n and depth["tasks"] == 0 and depth["tasks_pending"] == 0
        assert depth["complete"] == 0

        trainer.version += 1
        trainer.publish()  # newer weights arrive before the partials are resumed
        deliveries = buf.read_tasks(worker.name, count=n, block_ms=200)
        assert all(d.stream.endswith(":partials") for d in deliveries)
        worker.serve(deliveries)
        assert buf.depth()["partials_pending"] == 0

        seen = [unpack_entry(fields[b"data"]) for _, fields in buf.client.xrange(buf.key("complete"))]
        assert sorted(e.task.task_id for e in seen) == sorted(t.task_id for t in tasks)  # none lost
        for entry in seen:
            for traj in entry.group:
                assert traj.versions.tolist() == [v_old] * 2 + [v_old + 1] * 4
                assert traj.num_resumes == 1 and traj.status.value == "truncated"
        metrics = trainer.train_step(step=50, timeout_s=30)
        # trained with weights v_old+1: 2 tokens per sample are one version old, 4 are current
        samples = 2 * n
        assert metrics["staleness/lag1_tokens"] == 2 * samples
        assert metrics["staleness/lag0_tokens"] == 4 * samples
        assert metrics["offpolicy/token_frac"] == pytest.approx(2 / 6)
        assert metrics["offpolicy/resumed_sample_frac"] == 1.0
    finally:
        worker.buffer.poll = real_poll
        worker.cfg.mode, trainer.cfg.mode, worker.engine.cfg.chunk_tokens, worker.engine.eos_id = saved


def test_a_group_at_the_resume_cap_is_pinned_not_parked(rig):
    """With rollout.max_resumes=1, a group resumed once runs through the next round cut."""
    trainer, worker, buf = rig
    env = worker.env
    trainer.publish()
    saved = (worker.cfg.mode, worker.cfg.rollout.max_resumes, worker.engine.cfg.chunk_tokens, worker.engine.eos_id)
    worker.cfg.mode, worker.cfg.rollout.max_resumes = "april", 1
    worker.engine.cfg.chunk_tokens, worker.engine.eos_id = 2, -1
    real_poll = worker.buffer.poll

    def cut_every_round():
        buf.advance_round()
        return real_poll()

    try:
        buf.put_tasks([env.train_task(900, 0, 2, SamplingParams(1.0, 1.0, 6))])
        worker.buffer.poll = cut_every_round
        worker.serve(buf.read_tasks(worker.name, count=1, block_ms=200))
        assert buf.depth()["partials"] == 1  # parked at the first cut
        worker.serve(buf.read_tasks(worker.name, count=1, block_ms=200))
        depth = buf.depth()
        assert depth["partials"] == 0 and depth["complete"] == 1  # pinned: ran to the end despite cuts
        entry = unpack_entry(buf.client.xrange(buf.key("complete"))[0][1][b"data"])
        assert [len(t) for t in entry.group] == [6, 6] and [t.num_resumes for t in entry.group] == [1, 1]
    finally:
        worker.buffer.poll = real_poll
        worker.cfg.mode, worker.cfg.rollout.max_resumes, worker.engine.cfg.chunk_tokens, worker.engine.eos_id = saved
        buf.client.delete(buf.key("complete"))
        buf.ensure_groups()


def test_packed_rows_score_each_sequence_as_if_it_were_alone(rig):
    """The DeepSpeed policy on a packed batch (attention kept inside each sequence, positions
    restarting per sequence) gives every token the logprob it gets in the padded batch."""
    trainer, worker, buf = rig
    trainer.publish()
    worker.maybe_update_weights()
    env = worker.env
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    groups = worker.generate_groups([env.train_task(300 + i, 0, 3, sampling) for i in range(4)])
    trajs = [t for g in groups for t in g]
    padded = collate(trajs, torch.zeros(len(trajs)))
    packed, _ = padded.packed(trainer.cfg.model.max_seq_len)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    with torch.no_grad():
        lp_padded = token_logprobs(trainer.engine(padded.input_ids)[0][:, :-1], padded.targets)
        lp_packed = token_logprobs(trainer.engine(packed.input_ids, **packed.model_inputs())[0][:, :-1],
                                   packed.targets)
    for s in range(len(trajs)):
        mine = packed.mask.bool() & (packed.seq_ids == s)
        torch.testing.assert_close(lp_packed[mine], lp_padded[s][padded.mask[s].bool()], atol=1e-5, rtol=0)


def test_worker_admits_queued_groups_into_the_running_batch(rig):
    """Continuous batching: groups that reach the buffer while a long group is generating join
    the running batch at the next chunk boundary and ship before the long group ends, all
    within the same serve call (no tail blocks the queue)."""
    trainer, worker, buf = rig
    env = worker.env
    trainer.publish()
    worker.maybe_update_weights()
    saved = (worker.engine.cfg.chunk_tokens, worker.engine.eos_id)
    worker.engine.cfg.chunk_tokens, worker.engine.eos_id = 2, -1  # every sample runs to its budget
    real_poll = worker.buffer.poll
    short = [env.train_task(950 + i, 0, 2, SamplingParams(1.0, 1.0, 3)) for i in range(3)]
    calls = {"n": 0}

    def more_work_arrives():
        calls["n"] += 1
        if calls["n"] == 1:
            buf.put_tasks(short)
        return real_poll()

    try:
        buf.client.delete(buf.key("complete"))
        buf.ensure_groups()
        buf.put_tasks([env.train_task(949, 0, 2, SamplingParams(1.0, 1.0, 16))])
        worker.buffer.poll = more_work_arrives
        worker.serve(buf.read_tasks(worker.name, count=1, block_ms=200))
        shipped = [unpack_entry(f[b"data"]).task.task_id for _, f in buf.client.xrange(buf.key("complete"))]
        assert shipped[-1] == "train-0-949" and sorted(shipped[:-1]) == sorted(t.task_id for t in short)
        assert buf.depth()["tasks"] == 0 and buf.depth()["tasks_pending"] == 0
    finally:
        worker.buffer.poll = real_poll
        worker.engine.cfg.chunk_tokens, worker.engine.eos_id = saved
        buf.client.delete(buf.key("complete"))
        buf.ensure_groups()


def test_a_slow_reward_never_stalls_generation(rig):
    """A finished group is scored on a thread beside the engine: while its (slow) scoring runs,
    the engine keeps stepping the other group, and both ship with their rewards."""
    import threading
    import time

    trainer, worker, buf = rig
    env = worker.env
    trainer.publish()
    worker.maybe_update_weights()
    saved = (worker.engine.cfg.chunk_tokens, worker.engine.eos_id, worker.scorer.env)
    worker.engine.cfg.chunk_tokens, worker.engine.eos_id = 2, -1  # every sample runs to its budget
    window: dict[str, float] = {}
    steps: list[float] = []
    real_step = worker.engine.step

    class SlowFirstGroup:
        """The real env, except that scoring the short group takes 1 s (a slow sandboxed program)."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def score(self, answer, response):
            return self.inner.score(answer, response)

        def score_many(self, answers, responses):
            if len(responses[0]) == 2 and "start" not in window:
                window["start"] = time.perf_counter()
                time.sleep(1.0)
                window["end"] = time.perf_counter()
            return [self.inner.score(a, r) for a, r in zip(answers, responses)]

    def timed_step():
        steps.append(time.perf_counter())
        return real_step()

    try:
        buf.client.delete(buf.key("complete"))
        buf.ensure_groups()
        worker.scorer.env = SlowFirstGroup(env)
        worker.engine.step = timed_step
        buf.put_tasks([env.train_task(960, 0, 2, SamplingParams(1.0, 1.0, 2)),    # done after 1 chunk
                       env.train_task(961, 0, 2, SamplingParams(1.0, 1.0, 40))])  # 20 chunks
        main = threading.current_thread()
        worker.serve(buf.read_tasks(worker.name, count=2, block_ms=200))
        assert threading.current_thread() is main
        during = [t for t in steps if window["start"] < t < window["end"]]
        assert len(during) >= 3, f"the engine stepped {len(during)} times while a group was being scored"
        shipped = {unpack_entry(f[b"data"]).task.task_id: unpack_entry(f[b"data"]).group
                   for _, f in buf.client.xrange(buf.key("complete"))}
        assert set(shipped) == {"train-0-960", "train-0-961"}
        assert all(t.timings["reward_s"] >= 1.0 for t in shipped["train-0-960"])
        assert all(len(t) == 40 and "reward_s" in t.timings for t in shipped["train-0-961"])
    finally:
        del worker.engine.step
        worker.engine.cfg.chunk_tokens, worker.engine.eos_id, worker.scorer.env = saved
        buf.client.delete(buf.key("complete"))
        buf.ensure_groups()


def test_workers_wait_when_complete_is_full_and_resume_when_the_trainer_catches_up(rig):
    """Backpressure (buffer.max_complete): with the trainer behind, `complete` stops growing at
    the bound (plus what was already generating) and the worker's wait is counted; once the
    trainer takes groups, the worker goes on."""
    import threading
    import time

    trainer, worker, buf = rig
    env = worker.env
    trainer.publish()
    worker.maybe_update_weights()
    saved = worker.cfg.buffer.max_complete, worker.cfg.engine.max_batch_size
    buf.client.delete(buf.key("complete"), buf.key("tasks"))
    buf.ensure_groups()
    buf.clear_signal("stop")
    try:
        worker.cfg.buffer.max_complete = 2
        worker.cfg.engine.max_batch_size = 2  # one group of 2 generating at a time: the bound is exact
        worker.stats.backpressure_s = 0.0
        buf.put_tasks([env.train_task(970 + i, 0, 2, SamplingParams(1.0, 1.0, 3)) for i in range(8)])
        thread = threading.Thread(target=lambda: worker.run(max_tasks_per_batch=1), daemon=True)
        thread.start()
        time.sleep(3.0)
        assert buf.complete_depth() == 2
        assert worker.stats.backpressure_s > 1.0
        got = buf.read_complete("trainer-0", count=2, block_ms=100)
        buf.ack_trained(got)  # the trainer catches up: two more groups may come
        deadline = time.time() + 10
        while buf.complete_depth() < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert buf.complete_depth() == 2 and buf.client.xlen(buf.key("tasks")) >= 8 - 4
    finally:
        buf.set_signal("stop")
        thread.join(timeout=10)
        buf.clear_signal("stop")
        worker.cfg.buffer.max_complete, worker.cfg.engine.max_batch_size = saved
        buf.client.delete(buf.key("complete"), buf.key("tasks"))
        buf.ensure_groups()
