"""Weight push latency: from the trainer's publish until every rollout worker has loaded the new
weights, for 1, 2 and 4 workers and models of 1M, 10M and 100M parameters, against a plain memcpy
of the same bytes (the bound no transport can beat), for each transport that serves workers on
the trainer's node.

The path is the product's own (rlpost/weights.py): the trainer's ``WeightPublisher.publish``, the
version in Redis; each worker (a Ray actor, started once) is told "new version" through a Redis
list (standing for its poll at a chunk boundary, without a polling delay), reads the version
record from Redis as the product's workers do, loads it with ``load_published`` into its own
preallocated tensors (an engine's in-place ``load_weights``) and acknowledges through Redis. The
clock runs from before ``publish`` until the driver holds every acknowledgement.

* ``shm`` (what ``trainer.weight_transport=auto`` picks on one node): two slots in /dev/shm
  that everyone keeps mapped; one copy in, one copy out per worker.
* ``ray``: one ``ray.put``, the reference parked in the WeightStore actor, a zero-copy get per
  worker from the node's object store, then the worker's copy (what ``auto`` picks on clusters).

    python bench/weight_push.py            # ~2 minutes on 2 cores
Writes bench/results/weight_push.json (``--name``); the last line is ``RESULT weight_push <worst ratio to
memcpy at 4 workers, shm>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HEADLINE = "shm"


def make_state(params: int, tensors: int = 8) -> dict[str, torch.Tensor]:
    per = params // tensors
    return {f"model.layers.{i}.weight": torch.randn(per) for i in range(tensors)}


def memcpy_s(num_bytes: int, repeats: int = 5) -> float:
    src = np.random.randint(0, 255, num_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="1e6,1e7,1e8")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--transports", default="shm,ray")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--name", default="weight_push", help="results file: bench/results/<name>.json")
    args = ap.parse_args()

    import ray

    from rlpost.buffer import RedisBuffer
    from rlpost.redis_server import start_private_redis
    from rlpost.weights import WeightPublisher, WeightStore, load_published, store_name

    @ray.remote(num_cpus=0)
    class Loader:
        """A rollout worker's weight path without the engine: told of a version, it reads the
        version record, loads the weights into its own tensors and acknowledges."""

        def __init__(self, url: str, run: str, index: int, shapes: dict[str, tuple[int, ...]]):
            torch.set_num_threads(1)
            self.buffer = RedisBuffer.from_url(url, run)
            self.index = index
            self.params = {k: torch.empty(v) for k, v in shapes.items()}

        def _copy(self, state: dict[str, torch.Tensor], version: int) -> None:
            with torch.no_grad():
                for name, tensor in state.items():
                    self.params[name].copy_(tensor)

        def serve(self) -> int:
            client, loads = self.buffer.client, 0
            while True:
                _, message = client.blpop([self.buffer.key(f"bench:notify:{self.index}")])
                if message == b"stop":
                    return loads
                version = load_published(self.buffer.current_version(), self._copy, self.buffer.current_version)
                client.rpush(self.buffer.key("bench:acks"), version)
                loads += 1

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=max(os.cpu_count() or 2, 4), include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    redis_server = start_private_redis(tempfile.mkdtemp(prefix="rlpost-bench-"))
    buffer = RedisBuffer.from_url(redis_server.url, "weightbench")
    store = WeightStore.options(name=store_name("weightbench")).remote()
    ray.get(store.get.remote(-1))  # registered before anyone looks it up by name
    client, acks = buffer.client, buffer.key("bench:acks")
    rows, version = [], 0
    try:
        for transport in args.transports.split(","):
            publisher = WeightPublisher(buffer, transport, tempfile.mkdtemp())
            for params in (int(float(p)) for p in args.params.split(",")):
                state = make_state(params)
                num_bytes = sum(t.numel() * t.element_size() for t in state.values())
                bound = memcpy_s(num_bytes)
                for n in (int(w) for w in args.workers.split(",")):
                    shapes = {k: tuple(v.shape) for k, v in state.items()}
                    loaders = [Loader.remote(redis_server.url, "weightbench", i, shapes) for i in range(n)]
                    serving = [loader.serve.remote() for loader in loaders]
                    times = []
                    for rep in range(args.repeats + 1):  # the first push warms the actors up
                        version += 1
                        t0 = time.perf_counter()
                        wv = publisher.publish(state, version)
                        with client.pipeline(transaction=False) as pipe:
                            for i in range(n):
                                pipe.rpush(buffer.key(f"bench:notify:{i}"), version)
                            pipe.execute()
                        got = [int(client.blpop([acks], timeout=60)[1]) for _ in range(n)]
                        elapsed = time.perf_counter() - t0
                        assert wv.transport == transport and got == [version] * n, (wv, got)
                        if rep:
                            times.append(elapsed)
                    for i in range(n):
                        client.rpush(buffer.key(f"bench:notify:{i}"), "stop")
                    assert ray.get(serving) == [args.repeats + 1] * n
                    push = statistics.median(times)
                    rows.append({"transport": transport, "params": params, "bytes": num_bytes, "workers": n,
                                 "push_s": push, "push_s_all": times, "memcpy_s": bound,
                                 "ratio_to_memcpy": push / bound})
                    print(f"{transport:>4} {params:>11,d} params {num_bytes / 2**20:7.1f} MiB  {n} workers  "
                          f"push {push * 1e3:7.2f} ms (min {min(times) * 1e3:7.2f})  memcpy {bound * 1e3:6.2f} ms  "
                          f"ratio {push / bound:5.1f}x", flush=True)
                    for loader in loaders:
                        ray.kill(loader)
            publisher.close(unlink=True)
    finally:
        ray.shutdown()
        redis_server.stop()
    most = max(int(w) for w in args.workers.split(","))
    worst = {t: max(r["ratio_to_memcpy"] for r in rows if r["workers"] == most and r["transport"] == t)
             for t in args.transports.split(",")}
    headline = worst.get(HEADLINE, max(worst.values()))
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{args.name}.json"), "w") as fh:
        json.dump({"rows": rows, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "worst_ratio_at_max_workers": worst, "headline_transport": HEADLINE}, fh, indent=2)
    print(f"RESULT weight_push {headline:.2f}")


if __name__ == "__main__":
    main()
