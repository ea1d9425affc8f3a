"""The run driver: ``python -m rlpost.run experiment=toy_moe_local [overrides...]``.

This module is the composition root: it is the one place that imports rollout, trainer and envs
together. It starts (or connects to) Redis, places the trainer ranks and rollout workers as Ray
actors, runs the supervised warm-up (cached), evaluates, runs RL, evaluates again and writes the
run directory (resolved config, metrics JSONL, checkpoints, summary.json, curve.png).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from rlpost.config import ConfigError, RlpostConfig
from rlpost.envs.sandbox import SandboxUnavailable


@dataclass
class DriverState:
    """What the driver needs to continue a run from a checkpoint."""

    step: int = 0
    task_index: int = 0  # train tasks submitted so far
    refilled: int = 0  # of those, submitted in place of groups the trainer's filter dropped
    trained_groups: int = 0
    trained_samples: int = 0
    trained_tokens: int = 0
    eval_before: float | None = None
    evals: list[dict] = field(default_factory=list)


def _node_address() -> str:
    """This node's address as the other nodes of the cluster see it (the private Redis binds it)."""
    import ray

    return ray.util.get_node_ip_address()


RAY_WORKING_DIR_MARK = os.sep + "runtime_resources" + os.sep  # Ray's per-job copies of --working-dir


def make_run_dir(cfg: RlpostConfig) -> str:
    """``run_dir``, else ``<run_root>/<date>/<time>-<name>`` with run_root from the config, then
    $RLPOST_RUN_ROOT, then ./outputs. Inside a ``ray job submit --working-dir`` copy, ./outputs
    would vanish with Ray's session (checkpoints and the final model with it): refused."""
    if cfg.run_dir:
        path = cfg.run_dir
    else:
        root = cfg.run_root or os.environ.get("RLPOST_RUN_ROOT") or "outputs"
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        path = os.path.join(root, f"{stamp}-{cfg.name}")
    path = os.path.abspath(path)
    if RAY_WORKING_DIR_MARK in path:
        raise ConfigError(f"run_dir={path}: inside Ray's temporary copy of the job's working dir, deleted with "
                          f"the session; set run_root=/shared/path (or RLPOST_RUN_ROOT) or run_dir=...")
    os.makedirs(path, exist_ok=True)
    return path


def run_id(run_dir: str, name: str) -> str:
    """The run's id: its name plus a random suffix, created once and kept in the run dir, so a
    resumed run finds its own keys and two runs on one shared Redis never see each other's
    (two run dirs with the same basename used to share a namespace; the second followed the
    first one's ``version`` key and hung)."""
    path = os.path.join(run_dir, "run_id")
    try:
        with open(path) as fh:
            existing = fh.read().strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    new = f"{name}-{secrets.token_hex(4)}"
    with open(path + ".tmp", "w") as fh:
        fh.write(new + "\n")
    os.replace(path + ".tmp", path)
    return new


# env settings that only shape rewards: a run that changes them (algorithm=dapo's overlong
# shaping, a longer reward timeout) starts from the same warm-up
_REWARD_ONLY_ENV_FIELDS = ("reward_timeout_s", "reward_workers", "overlong_buffer", "overlong_penalty")


# the code that makes a warm-up: the model and its initialisation, the SFT step, the tokenizers
# and every built-in env (their demonstrations)
_WARMUP_MODULES = ("rlpost.modeling", "rlpost.tokenizer", "rlpost.trainer.policy", "rlpost.trainer.ds_engine",
                   "rlpost.trainer.actor")


def warmup_code_files(cfg: RlpostConfig) -> list[str]:
    """The source files whose code determines a warm-up's weights (found without importing them),
    the module of a custom env (``env.name=package.module:Factory``) included."""
    import importlib.util

    files = [importlib.util.find_spec(name).origin for name in _WARMUP_MODULES]
    for folder in importlib.util.find_spec("rlpost.envs").submodule_search_locations:
        files += sorted(glob.glob(os.path.join(folder, "*.py")))
    if ":" in cfg.env.name:
        try:
            spec = importlib.util.find_spec(cfg.env.name.partition(":")[0])
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            files.append(spec.origin)
    return files


def code_fingerprint(files: list[str]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()[:16]


def warmup_key(cfg: RlpostConfig) -> str:
    """Hash of everything that determines the warm-up weights, the code that makes it included:
    a cache shared across runs (``warmup.cache_dir``) is not reused by a changed model or env
    (an edited initialisation once gave a shared cache's 0.44 where the code made 0.405)."""
    warm = asdict(cfg.warmup)
    warm.pop("cache_dir")
    env = {k: v for k, v in asdict(cfg.env).items() if k not in _REWARD_ONLY_ENV_FIELDS}
    start = None
    if cfg.model.path:  # the checkpoint's weights are the warm-up's starting point
        weights = sorted(glob.glob(os.path.join(cfg.model.path, "*.safetensors")))
        start = [(os.path.basename(f), os.path.getsize(f), os.path.getmtime(f)) for f in weights]
    tokenizer = None
    if cfg.env.tokenizer == "hf" and cfg.env.tokenizer_path:  # its files and template make the demonstrations' ids
        names = ("tokenizer*", "chat_template*", "special_tokens_map.json", "vocab*", "merges*", "*.model")
        found = sorted({f for n in names for f in glob.glob(os.path.join(cfg.env.tokenizer_path, n))})
        tokenizer = [(os.path.basename(f), os.path.getsize(f), os.path.getmtime(f)) for f in found]
    blob = json.dumps({"model": asdict(cfg.model), "warmup": warm, "env": env,
                       "seed": cfg.seed, "start": start, "tokenizer": tokenizer, "code": code_fingerprint(warmup_code_files(cfg)), "v": 3},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunFailed(RuntimeError):
    """The run cannot go on (a worker died, training diverged); main() prints it as one line."""


class NonFiniteTraining(RunFailed):
    """The loss or gradient norm stayed non-finite: the run stops instead of training on NaN."""


class Run:
    """One RL run; ``execute()`` does everything and returns the summary."""

    def __init__(self, cfg: RlpostConfig):
        from rlpost.envs import make_env

        self.cfg = cfg
        self.env = make_env(cfg.env, cfg.sandbox)
        if getattr(self.env, "sandboxed", False):  # one smoke execution before anything starts
            from rlpost.envs.sandbox import verify_sandbox

            verify_sandbox(cfg.sandbox)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.env.tokenizer.vocab_size
        elif cfg.model.vocab_size < self.env.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer's "
                              f"{self.env.tokenizer.vocab_size}")
        if cfg.warmup.steps and not callable(getattr(self.env, "sft_example", None)):
            raise ConfigError(f"warmup.steps={cfg.warmup.steps}: env {cfg.env.name!r} has no sft_example "
                              f"(warm-up demonstrations); set warmup.steps=0")
        if cfg.warmup.steps and getattr(self.env, "missing_sft", False):
            raise ConfigError(f"warmup.steps={cfg.warmup.steps}: the training records' labels are lists or objects, "
                              f"which are no warm-up targets; set env.sft_key (a text target) or warmup.steps=0")
        needed = self.env.max_answer_len() + 1
        if cfg.rollout.max_new_tokens < needed:
            raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}: answers of this env "
                              f"need up to {needed} tokens (incl. eos)")
        self.dropped_prompts: dict[str, int] = {}
        if cfg.env.filter_long_prompts:
            dropped = self.env.drop_long_prompts(cfg.model.max_seq_len, cfg.rollout.max_new_tokens)
            self.dropped_prompts = {name: len(where) for name, where in dropped.items()}
            if any(dropped.values()):
                first = next(where[0] for where in dropped.values() if where)
                print(f"rlpost: env.filter_long_prompts dropped {self.dropped_prompts} prompts too long for "
                      f"model.max_seq_len={cfg.model.max_seq_len} with their completion budget (first: {first})",
                      flush=True)
        train_prompt = getattr(self.env, "longest_train_prompt", None)  # (tokens, where): datasets
        if train_prompt and train_prompt[0] + cfg.rollout.max_new_tokens > cfg.model.max_seq_len:
            raise ConfigError(f"model.max_seq_len={cfg.model.max_seq_len}: the training prompt at {train_prompt[1]} "
                              f"needs {train_prompt[0]} tokens + rollout.max_new_tokens={cfg.rollout.max_new_tokens}")
        longest = max(len(t.prompt_ids) + t.sampling.max_new_tokens for t in self.env.eval_tasks("check", 0))
        if longest > cfg.model.max_seq_len:
            raise ConfigError(f"model.max_seq_len={cfg.model.max_seq_len}: the eval set needs {longest} "
                              f"(its longest prompt + its completion budget)")
        self.run_dir = make_run_dir(cfg)
        self.run_name = os.path.basename(self.run_dir).replace(":", "-").replace("{", "-")
        self.run_id = run_id(self.run_dir, self.run_name)  # the Redis namespace and actor names
        self.redis = None
        self.buffer = None  # RedisBuffer once _start_buffer ran
        self.buffer_url: str | None = None
        self._last_liveness_check = 0.0
        self._stopping = threading.Event()
        self.redis_restarts = 0
        self.trainer_restarts = 0
        self._worker_where: list | None = None  # workers' placement, asked once (see _write_placement)
        self._nonfinite_steps = 0  # consecutive steps with a non-finite loss or gradient norm
        self.ranks: list = []
        self.workers: list = []
        self.worker_futures: list = []
        self.state = DriverState()

    # ------------------------------------------------------------------ infrastructure
    def _start_buffer(self):
        from rlpost.buffer import RedisBuffer
        from rlpost.redis_server import start_private_redis

        b = self.cfg.buffer
        password = None
        if b.url:
            url = b.url
        else:
            tcp = b.listen == "tcp" or (b.listen == "auto" and bool(self._ray_address()))
            host = _node_address() if tcp else None
            self.redis = start_private_redis(os.path.join(self.run_dir, "redis"), host=host,
                                             appendonly=b.appendonly, appendfsync=b.appendfsync)
            url, password = self.redis.url, self.redis.password or None
            threading.Thread(target=self._supervise_redis, name="redis-supervisor", daemon=True).start()
        self.buffer_url = url
        # the password from the environment keeps it off command lines (ps, ray job metadata)
        password = password or b.password or os.environ.get("RLPOST_REDIS_PASSWORD")
        self.buffer_auth = {k: v for k, v in (("username", b.username), ("password", password),
                                              ("ssl_ca_certs", b.ssl_ca_certs)) if v}
        self.buffer = RedisBuffer.from_url(url, self.run_id, **self.buffer_auth)
        self.buffer.client.ping()
        self.buffer.ensure_groups()
        self.buffer.clear_signal("stop")

    def _start_ray(self):
        import ray

        # torch before ray.init: a job driver on a multi-node cluster that imported torch after
        # ray.init died with "Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so" (measured
        # with `ray job submit` to two `ray start` nodes on one machine; importing it first works)
        import torch  # noqa: F401

        cfg = self.cfg
        env_vars = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONWARNINGS": "ignore::UserWarning"}
        address = self._ray_address()
        if address:
            ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
        else:
            needed = cfg.trainer.num_ranks * cfg.trainer.threads + cfg.rollout.num_workers * cfg.rollout.threads
            num_cpus = cfg.ray_num_cpus or max(os.cpu_count() or 1, needed)
            # address="local": a Ray of our own even when this machine also runs a `ray start`
            # head (plain ray.init() joins that one, and then refuses num_cpus with a traceback)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env_vars},
                     log_to_driver=True, configure_logging=False)
        # ray.init replaces the driver's SIGTERM handler with one that exits at once; ours unwinds
        # through execute()'s clean-up (workers stopped, private redis-server stopped).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)

    def _supervise_redis(self) -> None:
        """Restart the private redis-server if it dies (same directory, socket or port, password):
        its append-only file brings the buffer back and every actor's client reconnects on its
        own. Restarts are counted in the summary (``redis_restarts``)."""
        while not self._stopping.wait(0.25):
            server = self.redis
            if server is None or server.process.poll() is None or self._stopping.is_set():
                continue  # alive, or stopped by shutdown() on purpose
            code = server.process.returncode
            try:
                self.redis = server.restart()
            except Exception as exc:  # noqa: BLE001 - the run's own calls will fail and say why
                print(f"rlpost: private redis-server exited (code {code}) and could not be restarted: {exc}",
                      file=sys.stderr)
                return
            self.redis_restarts += 1
            print(f"rlpost: private redis-server exited (code {code}); restarted from its append-only file",
                  file=sys.stderr, flush=True)

    def _ray_address(self) -> str | None:
        return self.cfg.ray_address or os.environ.get("RAY_ADDRESS")

    def _start_actors(self):
        """Trainer ranks and rollout workers in their placement-group bundles (rlpost/placement.py),
        the DeepSpeed rendezvous on rank 0's node, and where everything landed in placement.json."""
        import ray

        from rlpost.placement import PlacementError, place
        from rlpost.rollout.worker import RolloutWorker
        from rlpost.weights import WeightStore, store_name

        cfg = self.cfg
        self.store = WeightStore.options(name=store_name(self.run_id)).remote()
        try:  # a Ray this driver started never grows: bundles it cannot hold fail at once
            self.placement = place(cfg, fixed_cluster=not self._ray_address())
            cfg.trainer.weight_transport = self.placement.weight_transport(cfg.trainer.weight_transport)
        except PlacementError as exc:
            raise RunFailed(f"placement: {exc}") from None
        p = self.placement
        worker_cls = ray.remote(RolloutWorker)  # workers first: they start up while the ranks do
        self.workers = [worker_cls.options(**p.worker_options(cfg, i)).remote(
            cfg, i, self.buffer_url, self.run_id, self.buffer_auth) for i in range(cfg.rollout.num_workers)]
        self._start_ranks()
        self._write_placement()

    def _start_ranks(self) -> None:
        """The DeepSpeed ranks in their bundles, meeting at rank 0's node (placement.master_*)."""
        import ray

        from rlpost.trainer.actor import TrainerRank
        from rlpost.trainer.ds_engine import DistEnv

        cfg, p = self.cfg, self.placement
        trainer_cls = ray.remote(TrainerRank)
        self.ranks = [
            trainer_cls.options(**p.trainer_options(cfg, r)).remote(
                cfg, DistEnv(r, cfg.trainer.num_ranks, p.master_addr, p.master_port), self.buffer_url,
                self.run_id, self.run_dir, self.buffer_auth)
            for r in range(cfg.trainer.num_ranks)
        ]
        ray.get([r.ping.remote() for r in self.ranks])

    def _write_placement(self) -> None:
        """placement.json. Workers are asked once, before their loops start (a worker's actor
        runs one call at a time: asked later, the question would wait behind its loop forever)."""
        import ray

        if self._worker_where is None:
            self._worker_where = ray.get([w.where.remote() for w in self.workers])
        actors = {"trainer": ray.get([r.where.remote() for r in self.ranks]), "workers": self._worker_where}
        with open(os.path.join(self.run_dir, "placement.json"), "w") as fh:
            json.dump({**self.placement.describe(), "actors": actors, "buffer": self.buffer_url,
                       "weight_transport": self.cfg.trainer.weight_transport}, fh, indent=1)

    def _warmup_folder(self) -> str:
        """Where this run's warm-up weights are cached (keyed by everything that determines them)."""
        cfg = self.cfg
        return os.path.join(cfg.warmup.cache_dir or os.path.join(self.run_dir, "warmup"), warmup_key(cfg))

    def _is_rank(self, exc) -> bool:
        """Whether a RayActorError is about one of the trainer ranks (workers restart on their own)."""
        dead = getattr(exc, "actor_id", None)
        return dead is not None and any(rank._actor_id.hex() == dead for rank in self.ranks)

    def _recover_trainer(self, exc, unfinished_step: bool) -> int:
        """The RL loop's answer to a RayActorError: a worker's is not ours to handle (workers
        restart on their own), a trainer rank's restarts the trainer while restarts are left.
        Returns the weights version to go on with."""
        if not self._is_rank(exc):
            raise exc
        limit = self.cfg.trainer.max_restarts
        if self.trainer_restarts >= limit:
            raise RunFailed(f"trainer rank died after {self.trainer_restarts} restart(s) "
                            f"(trainer.max_restarts={limit}): {str(exc).strip().splitlines()[0][:300]}") from exc
        if unfinished_step:
            self.state.step -= 1  # the unfinished step is done again by the new ranks
        return self._restart_trainer(type(exc).__name__)

    def _restart_trainer(self, why: str) -> int:
        """A trainer rank died: stop every rank (their process group is broken), start them
        again in the same bundles with a new rendezvous port, load the latest checkpoint and
        publish it under a version newer than anything published, so workers swap to it. The
        buffer is kept as it is: groups trained after the checkpoint stay trained (their update
        is lost, none is trained twice), the dead step's groups are trained by the new ranks.
        Returns the published version."""
        import ray

        latest = self._latest_checkpoint()
        if latest is None:
            raise RunFailed(f"trainer rank died ({why}) and there is no checkpoint to restart it from "
                            f"(set trainer.checkpoint_every)")
        folder, tag = latest
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        self.placement.fresh_master_port()
        self._start_ranks()
        self._on_all_ranks("load_checkpoint", folder, tag)
        if self.cfg.trainer.kl_coef > 0:  # the KL reference stays the policy RL started from
            from rlpost.modeling import load_pretrained

            start = self._warmup_folder()
            if not os.path.exists(os.path.join(start, "model.safetensors")):
                start = self.cfg.model.path  # no warm-up: RL started from the checkpoint itself
            if not start:
                raise RunFailed("trainer restart: no warm-up or model.path weights to rebuild the KL reference from")
            reference, _ = load_pretrained(start)
            self._on_all_ranks("set_reference", reference)
        published = self.buffer.current_version()
        self._on_all_ranks("set_version", (published.version if published else 0) + 1)
        version = self._on_all_ranks("publish")[0]["weights/version"]
        self.trainer_restarts += 1
        self._write_placement()
        print(f"rlpost: trainer restarted from checkpoint {tag} after: {why}; now at weights v{version}",
              file=sys.stderr, flush=True)
        return version

    def _start_workers(self):
        """Start the workers' loops (after a checkpoint restore, so they see the restored buffer
        and serve their previous life's unacked items first)."""
        self.worker_futures = [w.run.remote() for w in self.workers]

    def _call_all_ranks(self, method: str, *args) -> list:
        """Submit ``method`` to every trainer rank; the refs, not waited for."""
        return [getattr(r, method).remote(*args) for r in self.ranks]

    def _on_all_ranks(self, method: str, *args):
        """Call ``method`` on every trainer rank and wait for all of them."""
        return self._wait_all(self._call_all_ranks(method, *args))

    def _wait_all(self, refs: list, while_waiting: Callable[[], bool] | None = None) -> list:
        """Wait for ``refs``, failing fast (with the worker's own traceback) if a rollout worker
        dies meanwhile instead of waiting for groups that never come. ``while_waiting`` is
        polled every few milliseconds until it returns True."""
        import ray

        while True:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.005 if while_waiting else 1.0)
            if len(done) == len(refs):
                self._check_workers_every(1.0)  # also between short calls (warm-up steps)
                return ray.get(refs)
            if while_waiting is not None and while_waiting():
                while_waiting = None
            self._check_workers_every(1.0)

    def _check_workers_every(self, period_s: float) -> None:
        """Liveness check at most every ``period_s``, wherever the driver waits. The clock is
        the run's, not the call's: a check timer reset on every call never fired during the
        warm-up's sub-second steps, and a worker that died then was noticed only at the
        evaluation's 300 s timeout."""
        if time.monotonic() - self._last_liveness_check >= period_s:
            self._last_liveness_check = time.monotonic()
            self._check_workers()

    def _launch_step(self, version: int) -> tuple[list, Callable[[], bool] | None]:
        """Admit the step's tasks and start ``train_step`` on every rank; returns at once with
        the refs and what to poll while the step runs: in april mode the top-up (the batch
        stops being "in flight" the moment the trainer has collected it: it advances the
        round, so the workers get fresh prompts while the step trains instead of after it),
        and with ``rollout.filter_uniform_groups`` the prompts that replace dropped groups."""
        self.admit(version)
        self.state.step += 1
        april = self.cfg.mode == "april"
        start_round = self.buffer.current_round() if april else 0
        refs = [r.train_step.remote(self.state.step) for r in self.ranks]
        if not april and not self.cfg.rollout.filter_uniform_groups:
            return refs, None
        topped_up = not april

        def poll() -> bool:
            nonlocal topped_up
            self.refill(version)
            if not topped_up and self.buffer.current_round() != start_round:
                self.admit(version, taken=self.cfg.rollout.batch_prompts)
                topped_up = True
            return topped_up and not self.cfg.rollout.filter_uniform_groups  # True: no more polls

        return refs, poll

    def _check_finite(self, metrics: dict) -> None:
        """Count steps whose loss or gradient norm is not finite (logged as ``train/nonfinite``);
        ``trainer.max_nonfinite_steps`` of them in a row stop the run with an error (exit code
        1), instead of training on NaN to the end and exiting 0."""
        bad = [k for k in ("train/loss", "train/grad_norm") if not math.isfinite(float(metrics.get(k, 0.0)))]
        metrics["train/nonfinite"] = int(bool(bad))
        self._nonfinite_steps = self._nonfinite_steps + 1 if bad else 0
        limit = self.cfg.trainer.max_nonfinite_steps
        if self._nonfinite_steps >= limit:
            raise NonFiniteTraining(f"{', '.join(bad)} not finite for {self._nonfinite_steps} steps in a row "
                                    f"(step {self.state.step}; trainer.max_nonfinite_steps={limit})")

    def _check_workers(self) -> None:
        import ray

        if not self.worker_futures:
            return
        finished, _ = ray.wait(self.worker_futures, num_returns=len(self.worker_futures), timeout=0)
        if finished and self.buffer.signal("stop") is None:
            index = self.worker_futures.index(finished[0])
            try:
                ray.get(finished)
            except ray.exceptions.RayActorError as exc:  # killed, OOM, node lost
                first = str(exc).strip().splitlines()[0][:300]
                raise RunFailed(f"rollout worker {index} died: {type(exc).__name__}: {first}") from exc
            # (any other exception of the worker re-raises above with its own traceback)
            raise RunFailed(f"rollout worker {index} stopped although no stop signal was given")

    # ------------------------------------------------------------------ phases
    def warmup(self, log) -> dict:
        """Supervised warm-up, or load it from the cache when the same one was done before."""
        from rlpost.modeling import load_pretrained

        cfg = self.cfg
        folder = self._warmup_folder()
        if os.path.exists(os.path.join(folder, "model.safetensors")):
            state, _ = load_pretrained(folder)
            self._on_all_ranks("load_state", state)
            return {"warmup/cached": True, "warmup/path": folder}
        if cfg.model.path:
            state, _ = load_pretrained(cfg.model.path)
            self._on_all_ranks("load_state", state)
        t0 = time.perf_counter()
        losses: list[float] = []

        def finish(step: int, refs: list) -> None:
            m = self._wait_all(refs)[0]
            losses.append(m["sft/loss"])
            if step % 10 == 0 or step == cfg.warmup.steps - 1:
                log({**m, "phase": "warmup", "warmup_step": step}, step=0)

        # two steps in flight: the ranks start the next step as soon as they finish one, while
        # the driver makes the following batch and collects the last result (a rank runs its calls
        # in submission order, so the weights are those of one step at a time; on 2 cores the
        # driver's share was ~10% of a toy warm-up step)
        previous: tuple[int, list] | None = None
        for step in range(cfg.warmup.steps):
            examples = [self.env.sft_example(step * cfg.warmup.batch_size + i, seed=10_000 + cfg.seed)
                        for i in range(cfg.warmup.batch_size)]
            submitted = (step, self._call_all_ranks("sft_step", examples, cfg.warmup.lr))
            if previous is not None:
                finish(*previous)
            previous = submitted
        if previous is not None:
            finish(*previous)
        if cfg.warmup.steps:
            self._on_all_ranks("save_pretrained", folder)  # collective: expert slices are gathered
            with open(os.path.join(folder, "warmup.json"), "w") as fh:
                json.dump({"losses": losses, "seconds": time.perf_counter() - t0}, fh)
        return {"warmup/cached": False, "warmup/seconds": time.perf_counter() - t0,
                "warmup/final_loss": losses[-1] if losses else None}

    def evaluate(self, tag: str, version: int) -> tuple[dict[str, float], list[dict]]:
        """``eval/accuracy`` (and ``eval/pass@k`` when several answers are sampled per prompt) on
        the held-out prompts, generated by the rollout workers at ``version``, and the answers
        (also written to ``evals/<tag>.jsonl``); each extra set of ``env.eval_sets`` is generated
        in the same round and reported as ``eval/<name>/...``, its answers in ``evals/<tag>.<name>.jsonl``."""
        from rlpost.evaluation import answer_rows, eval_metrics, with_eval_sampling, write_answers

        tasks = with_eval_sampling(self.env.eval_tasks(tag, min_version=version), self.cfg.eval)
        self.buffer.put_tasks(tasks)
        trajs = self.buffer.read_eval(tag, expected=len(tasks), timeout_s=self.cfg.eval.timeout_s,
                                      while_waiting=lambda: self._check_workers_every(1.0))
        self.buffer.client.delete(self.buffer.key(f"eval:{tag}"))
        set_of = {t.task_id: t.meta.get("eval_set") for t in tasks}  # None: the main set (env.eval_sets)
        by_set: dict = {}
        for t in trajs:
            by_set.setdefault(set_of.get(t.task_id), []).append(t)
        main = by_set.pop(None, [])
        answers = answer_rows(main, self.env.tokenizer)
        write_answers(self.run_dir, tag, answers)
        result = eval_metrics(main, self.cfg.eval.samples_per_prompt)
        for name, members in sorted(by_set.items()):
            write_answers(self.run_dir, f"{tag}.{name}", answer_rows(members, self.env.tokenizer))
            metrics = eval_metrics(members, self.cfg.eval.samples_per_prompt)
            result.update({f"eval/{name}/{k.split('/', 1)[1]}": v for k, v in metrics.items()})
        return result, answers

    def _evaluate_at(self, step: int, tag: str, version: int, logger) -> dict[str, float]:
        """An evaluation kept in the driver state (summary.json's ``evals``), its first answers
        logged as a table; returns its metrics."""
        result, answers = self.evaluate(tag, version)
        self.state.evals.append({"step": step, "accuracy": result["eval/accuracy"],  # pass@k, <set>/accuracy
                                 **{k.split("/", 1)[1]: v for k, v in result.items() if k != "eval/accuracy"}})
        logger.table("eval/answers", answers[:self.cfg.logger.table_rows], step=step)
        return result

    def train_tasks(self, count: int, min_version: int):
        from rlpost.records import SamplingParams

        r = self.cfg.rollout
        sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
        tasks = []
        for i in range(count):
            task = self.env.train_task(self.state.task_index + i, self.cfg.seed, r.group_size, sampling)
            task.min_version = min_version
            tasks.append(task)
        self.state.task_index += count
        return tasks

    def admit(self, version: int, taken: int = 0) -> int:
        """Submit the train tasks the mode's admission rule allows (rlpost.scheduler); ``taken``
        groups are collected by a step in progress and count as trained. Prompts submitted in
        place of dropped groups (``refill``) take those groups' places, outside the rule."""
        from rlpost.scheduler import groups_to_admit

        r = self.cfg.rollout
        count = groups_to_admit(self.cfg.mode, self.state.step, self.state.task_index - self.state.refilled,
                                self.state.trained_groups + taken, r.batch_prompts, r.over_sampling, r.max_staleness)
        if count > 0:
            self.buffer.put_tasks(self.train_tasks(count, self._min_version(version)))
        return count

    def refill(self, version: int) -> int:
        """One new prompt for every group the trainer's uniform-reward filter dropped and no
        prompt has replaced yet (the count lives in Redis: every rank drops its own)."""
        owed = self.buffer.filtered_groups() - self.state.refilled
        if owed > 0:
            self.buffer.put_tasks(self.train_tasks(owed, self._min_version(version)))
            self.state.refilled += owed
        return max(owed, 0)

    def _min_version(self, version: int) -> int:
        # sync waits for the newest weights (on-policy); the others start with whatever is there.
        return version if self.cfg.mode == "sync" else 0

    def checkpoint(self) -> str:
        """DeepSpeed state of every rank + the driver's counters + an atomic snapshot of the
        run's Redis keys (tasks, partial groups, consumer groups with their pending entries,
        trained ids): a resumed run continues its partial trajectories instead of losing them."""
        import msgpack

        folder = os.path.join(self.run_dir, "checkpoints")
        tag = f"step{self.state.step}"
        self._on_all_ranks("save_checkpoint", folder, tag)
        with open(os.path.join(folder, tag, "buffer.msgpack"), "wb") as fh:
            fh.write(msgpack.packb(self.buffer.snapshot(), use_bin_type=True))
        with open(os.path.join(folder, tag, "driver_state.json"), "w") as fh:
            json.dump(asdict(self.state), fh)
        with open(os.path.join(folder, "latest_driver.tmp"), "w") as fh:
            fh.write(tag)
        os.replace(os.path.join(folder, "latest_driver.tmp"), os.path.join(folder, "latest_driver"))
        return os.path.join(folder, tag)

    def _latest_checkpoint(self) -> tuple[str, str] | None:
        """(checkpoints folder, tag) of the latest complete checkpoint, or None."""
        folder = os.path.join(self.run_dir, "checkpoints")
        marker = os.path.join(folder, "latest_driver")
        if not os.path.exists(marker):
            return None
        with open(marker) as fh:
            return folder, fh.read().strip()

    def _check_layout(self, folder: str, tag: str) -> None:
        """A checkpoint saved by differently laid-out trainer ranks (ranks, expert slices, ZeRO
        stage, precision) is refused with the differences named, before DeepSpeed reads it.
        Checkpoints from before the layout file was written are loaded unchecked."""
        import ray

        from rlpost.trainer.ds_engine import LAYOUT_FILE, layout_mismatch

        path = os.path.join(folder, tag, LAYOUT_FILE)
        if not os.path.exists(path):
            return
        try:
            with open(path) as fh:
                saved = json.load(fh)
        except (OSError, ValueError) as exc:
            raise RunFailed(f"resume: {path} cannot be read ({type(exc).__name__}: {exc})") from None
        if not isinstance(saved, dict):
            raise RunFailed(f"resume: {path} holds {type(saved).__name__}, not the ranks' layout object")
        why = layout_mismatch(saved, ray.get(self.ranks[0].layout.remote()))
        if why:
            raise RunFailed(f"resume from {os.path.join(folder, tag)}: {why}")

    def try_resume(self) -> bool:
        import msgpack

        latest = self._latest_checkpoint()
        if latest is None:
            return False
        folder, tag = latest
        self._check_layout(folder, tag)
        self._on_all_ranks("load_checkpoint", folder, tag)
        with open(os.path.join(folder, tag, "driver_state.json")) as fh:
            self.state = DriverState(**json.load(fh))
        with open(os.path.join(folder, tag, "buffer.msgpack"), "rb") as fh:
            self.buffer.restore(msgpack.unpackb(fh.read(), raw=True))
        self.buffer.clear_signal("stop")
        _truncate_trained_log(self.run_dir, self.state.step)
        return True

    def worker_totals(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for info in self.buffer.workers().values():
            for k, v in info.items():
                if isinstance(v, (int, float)) and k not in ("pid", "version", "started_at", "now"):
                    totals[k] = totals.get(k, 0.0) + v
        return totals

    # ------------------------------------------------------------------ main
    def execute(self) -> dict:
        import ray

        from rlpost.cli_config import public, to_yaml
        from rlpost.metrics import MetricsLogger
        from rlpost.plot import plot_run
        from rlpost.rollout_dump import SAMPLES_KEY, write_rollouts

        cfg = self.cfg
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as fh:
            fh.write(to_yaml(cfg))
        logger = MetricsLogger(cfg.logger, self.run_dir, self.run_name, cfg.trainer.steps, asdict(public(cfg)))
        t_start = time.time()
        summary: dict = {"run_dir": self.run_dir, "name": cfg.name, "mode": cfg.mode}
        try:
            self._start_buffer()
            self._start_ray()
            self._start_actors()
            resumed = self.try_resume()
            self._start_workers()
            if not resumed:
                summary.update(self.warmup(logger.log))
            version = self._on_all_ranks("publish")[0]["weights/version"]
            self._on_all_ranks("begin_rl")
            if self.state.eval_before is None:
                result = self._evaluate_at(0, "before", version, logger)
                self.state.eval_before = result["eval/accuracy"]
                logger.log(result, step=0)
            rl_start = last_step_at = time.time()
            last: dict = {}
            prev_totals, prev_t = self.worker_totals(), time.time()
            step_job = None

            def may_start_next() -> bool:
                if self.state.step >= cfg.trainer.steps:
                    return False
                if cfg.time_limit_s and time.time() - rl_start > cfg.time_limit_s:
                    summary["stopped_by_time_limit"] = True
                    return False
                return True

            while step_job is not None or may_start_next():
                try:
                    if step_job is None:
                        step_job = self._launch_step(version)
                    results = self._wait_all(*step_job)
                    metrics = results[0]
                    samples = [row for r in results for row in r.pop(SAMPLES_KEY, [])]  # logger.rollouts_every
                    step_job = None
                    self._check_finite(metrics)
                    last_step_at = time.time()
                    version = int(metrics.get("weights/version", version))
                    self.state.trained_groups += cfg.rollout.batch_prompts
                    self.state.trained_samples += int(metrics["train/samples"]) * cfg.trainer.num_ranks
                    self.state.trained_tokens += int(metrics["train/tokens"]) * cfg.trainer.num_ranks
                    step = self.state.step
                    if samples:  # and the first rows to wandb, as the eval answers go
                        dumped = write_rollouts(self.run_dir, step, samples, self.env.tokenizer)
                        logger.table("rollouts/samples", dumped[:cfg.logger.table_rows], step=step)
                    eval_due = bool(cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.trainer.steps)
                    checkpoint_due = bool(cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0)
                    if not (eval_due or checkpoint_due) and may_start_next():
                        # the trainer starts the next step now; the bookkeeping below overlaps it
                        step_job = self._launch_step(version)
                    depth = self.buffer.depth()
                    metrics.update({f"buffer/{k}": v for k, v in depth.items()})
                    metrics["buffer/complete_depth"] = depth["complete"]  # bounded by buffer.max_complete
                    if cfg.rollout.filter_uniform_groups:  # all ranks' (filter/dropped_groups is rank 0's step)
                        metrics["filter/dropped_total"] = self.buffer.filtered_groups()
                    totals, now = self.worker_totals(), time.time()
                    wall = max(now - prev_t, 1e-9) * max(cfg.rollout.num_workers, 1)
                    metrics.update({
                        "rollout/idle_frac": min(1.0, (totals.get("idle_s", 0) - prev_totals.get("idle_s", 0)) / wall),
                        # engine speed: tokens generated per second spent generating, all workers (cumulative:
                        # heartbeats come every 0.5 s, a per-step difference would be mostly zeros)
                        "rollout/tokens_per_s": totals.get("tokens", 0) / max(totals.get("gen_s", 0), 1e-9),
                        "rollout/aborted_tokens": totals.get("aborted_tokens", 0),
                        "rollout/parked_groups": totals.get("parked_groups", 0),
                        "rollout/resumed_groups": totals.get("resumed_groups", 0),
                        "rollout/stale_restarts": totals.get("stale_restarts", 0),
                        "rollout/backpressure_s": totals.get("backpressure_s", 0),
                        "rollout/worker_restarts": totals.get("restarts", 0),
                        "train/idle_frac": metrics["train/wait_s"] / max(metrics["train/wait_s"] + metrics["train/step_s"], 1e-9),
                        "throughput/samples_per_s": self.state.trained_samples / max(now - rl_start, 1e-9),
                        "throughput/trained_tokens_per_s": self.state.trained_tokens / max(now - rl_start, 1e-9),
                        "time/elapsed_s": now - t_start,
                    })
                    prev_totals, prev_t = totals, now
                    if eval_due:
                        metrics.update(self._evaluate_at(step, f"step{step}", version, logger))
                    if checkpoint_due:
                        self.checkpoint()
                    logger.log(metrics, step=step)
                    logger.progress(step, metrics)
                    last = metrics
                except ray.exceptions.RayActorError as exc:
                    # a trainer rank died: the ranks start again from the latest checkpoint (a
                    # worker's death is re-raised there: workers restart on their own)
                    version = self._recover_trainer(exc, unfinished_step=step_job is not None)
                    step_job = None
            # The final weights must be the ones evaluated, whatever publish_every says.
            version = self._on_all_ranks("publish")[0].get("weights/version", version)
            result = self._evaluate_at(self.state.step, "after", version, logger)
            after = result["eval/accuracy"]
            logger.log(result, step=self.state.step)
            if cfg.trainer.checkpoint_every:
                self.checkpoint()
            self._on_all_ranks("save_pretrained", os.path.join(self.run_dir, "final"))
            if callable(getattr(self.env.tokenizer, "save", None)):  # env.tokenizer=hf: final/ is a whole checkpoint
                self.env.tokenizer.save(os.path.join(self.run_dir, "final"))
            summary.update({
                "eval_accuracy_before": self.state.eval_before,
                "eval_accuracy_after": after,
                "eval_accuracy_gain": after - self.state.eval_before,
                "steps": self.state.step,
                "rl_seconds": time.time() - rl_start,
                # from the first to the end of the last training step (no final evaluation)
                "train_seconds": last_step_at - rl_start,
                "total_seconds": time.time() - t_start,
                "final_train_reward": last.get("reward/mean"),
                "redis_restarts": self.redis_restarts,
                "trainer_restarts": self.trainer_restarts,
                "trained_samples": self.state.trained_samples,
                "trained_tokens": self.state.trained_tokens,
                "samples_per_s": self.state.trained_samples / max(time.time() - rl_start, 1e-9),
                "filtered_groups": self.buffer.filtered_groups(),
                "dropped_long_prompts": self.dropped_prompts,  # env.filter_long_prompts, per set
                "evals": self.state.evals,
                "weight_transport": getattr(self.buffer.current_version(), "transport", None),
            })
            self.buffer.set_signal("stop")
            stats = ray.get(self.worker_futures, timeout=60)
            summary["workers"] = stats
            logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        finally:
            logger.close()
            self.shutdown()
        with open(os.path.join(self.run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        plot_run(self.run_dir)
        return summary

    def _release_weight_slots(self) -> None:
        """Remove the shared-memory weight slots on rank 0's node (and on this one, should rank 0
        be gone): they are as large as two copies of the model."""
        import ray

        from rlpost.weight_slots import remove_slots, slot_base

        if self.ranks:
            try:
                ray.get(self.ranks[0].release_weights.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        remove_slots(slot_base(self.run_id))

    def shutdown(self) -> None:
        import ray

        try:
            if self.buffer is not None:
                self.buffer.set_signal("stop")
        except Exception as exc:  # best effort: the server may be gone already
            print(f"rlpost: could not send the stop signal: {exc}", file=sys.stderr)
        if ray.is_initialized():
            self._release_weight_slots()
            if getattr(self, "placement", None) is not None:  # a shared cluster gets its resources back
                self.placement.remove()
            ray.shutdown()
        self._stopping.set()
        if self.redis is not None:
            self.redis.stop()


def _truncate_trained_log(run_dir: str, step: int) -> None:
    """Forget trained-id records of steps after the checkpoint being resumed (their weights are lost)."""
    for path in glob.glob(os.path.join(run_dir, "trained_ids.rank*.jsonl")):
        with open(path) as fh:
            keep = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w") as fh:
            fh.writelines(keep)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from rlpost.cli_config import env_overrides, load_config, to_yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Config groups: experiment, model, engine, env, trainer, buffer, logger. "
              "Print the resolved config with --cfg.")
        return 0
    show = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    try:
        cfg = load_config(env_overrides() + argv)
        if show:
            print(to_yaml(cfg))
            return 0
        run = Run(cfg)
    except ConfigError as exc:
        print(f"rlpost: config error: {exc}", file=sys.stderr)
        return 2
    except SandboxUnavailable as exc:
        print(f"rlpost: sandbox: {exc}", file=sys.stderr)
        return 2
    print(f"rlpost: run dir {run.run_dir}", flush=True)  # where checkpoints, metrics and the model go
    # SIGTERM (ray job stop, kubectl delete, CI timeouts) unwinds like Ctrl-C, so the private
    # redis-server and the Ray actors are stopped by execute()'s cleanup instead of leaking.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = run.execute()
    except KeyboardInterrupt:
        print(f"rlpost: interrupted; run dir {run.run_dir}", file=sys.stderr)
        return 130
    except RunFailed as exc:
        print(f"rlpost: run failed: {exc}; run dir {run.run_dir}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary.get(k) for k in ("run_dir", "eval_accuracy_before", "eval_accuracy_after",
                                                  "steps", "rl_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
