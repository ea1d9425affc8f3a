"""Weight push latency: from the trainer's publish until every rollout worker has loaded the new
weights, for 1, 2 and 4 workers and models of 1M, 10M and 100M parameters, against a plain memcpy
of the same bytes (the bound no transport can beat).

The path is the product's own (rlpost/weights.py): one ``ray.put`` of a flat buffer, parked in
the named WeightStore actor, the version in Redis; each worker (a Ray actor) reads the version,
gets the object zero-copy from the node's object store and copies it into its own preallocated
tensors, as an engine's in-place ``load_weights`` does. Nothing goes through the driver once per
worker.

    python bench/weight_push.py            # ~2 minutes on 2 cores
Writes bench/results/weight_push.json; the last line is ``RESULT weight_push <worst ratio to
memcpy at 4 workers>``.
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

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "weight_push.json")


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
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ray

    from rlpost.buffer import RedisBuffer
    from rlpost.records import WeightVersion
    from rlpost.redis_server import start_private_redis
    from rlpost.weights import WeightPublisher, WeightStore, fetch_weights, store_name

    @ray.remote(num_cpus=0)
    class Loader:
        """A rollout worker's weight path without the engine: fetch, then copy into its own tensors."""

        def __init__(self, shapes: dict[str, tuple[int, ...]]):
            torch.set_num_threads(1)
            self.params = {k: torch.empty(v) for k, v in shapes.items()}

        def load(self, wv: dict) -> int:
            state, version = fetch_weights(WeightVersion(**wv))
            with torch.no_grad():
                for name, tensor in state.items():
                    self.params[name].copy_(tensor)
            return version

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(os.cpu_count() or 2, 4), include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    redis_server = start_private_redis(tempfile.mkdtemp(prefix="rlpost-bench-"))
    buffer = RedisBuffer.from_url(redis_server.url, "weightbench")
    store = WeightStore.options(name=store_name("weightbench")).remote()
    ray.get(store.get.remote(-1))  # registered before anyone looks it up by name
    publisher = WeightPublisher(buffer, "ray", tempfile.mkdtemp())
    rows, version = [], 0
    try:
        for params in (int(float(p)) for p in args.params.split(",")):
            state = make_state(params)
            num_bytes = sum(t.numel() * t.element_size() for t in state.values())
            bound = memcpy_s(num_bytes)
            for n in (int(w) for w in args.workers.split(",")):
                loaders = [Loader.remote({k: tuple(v.shape) for k, v in state.items()}) for _ in range(n)]
                times = []
                for rep in range(args.repeats + 1):  # the first push warms the actors up
                    version += 1
                    t0 = time.perf_counter()
                    wv = publisher.publish(state, version)
                    got = ray.get([loader.load.remote(vars(wv)) for loader in loaders])
                    elapsed = time.perf_counter() - t0
                    assert got == [version] * n, got
                    if rep:
                        times.append(elapsed)
                push = statistics.median(times)
                rows.append({"params": params, "bytes": num_bytes, "workers": n, "push_s": push,
                             "push_s_all": times, "memcpy_s": bound, "ratio_to_memcpy": push / bound})
                print(f"{params:>11,d} params {num_bytes / 2**20:8.1f} MiB  {n} workers  push {push * 1e3:8.1f} ms"
                      f"  memcpy {bound * 1e3:7.2f} ms  ratio {push / bound:6.1f}x", flush=True)
                for loader in loaders:
                    ray.kill(loader)
    finally:
        ray.shutdown()
        redis_server.stop()
    worst = max(r["ratio_to_memcpy"] for r in rows if r["workers"] == max(int(w) for w in args.workers.split(",")))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump({"rows": rows, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "worst_ratio_at_max_workers": worst}, fh, indent=2)
    print(f"RESULT weight_push {worst:.2f}")


if __name__ == "__main__":
    main()
