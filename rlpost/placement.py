"""Where every actor of a run goes: one module, in the spirit of slime's ``ray/placement_group.py``.

Trainer ranks and rollout workers are bundles of placement groups: one group for the ranks and one
for the workers, or a single one whose bundle ``i`` holds rank ``i`` and worker ``i``
(``placement.colocate``: they share the bundle's GPU, half each). Bundles are reserved up front
(all or nothing, so a run never starts half-placed) with ``placement.strategy`` (PACK fills nodes
one after another; SPREAD puts bundles on different nodes where it can).

Ranks are numbered by (node, GPU) order of their bundles, so neighbouring ranks share a node,
and the DeepSpeed rendezvous goes to rank 0's node: a probe task in rank 0's bundle reports that
node's address and a port free *there* (the driver's own node and port meant nothing on another
machine). Inside an actor, Ray's ``CUDA_VISIBLE_DEVICES`` holds exactly the GPU(s) it was given,
so its local device is always ``cuda:0`` (trainer/ds_engine.py sets LOCAL_RANK accordingly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlpost.config import RlpostConfig


@dataclass
class BundleInfo:
    """What a probe task saw inside a bundle."""

    index: int
    node_ip: str
    node_id: str
    gpu_ids: list[str]
    free_port: int


@dataclass
class Placement:
    trainer_pg: Any
    worker_pg: Any
    # pg bundle index of trainer rank r / rollout worker i, in (node, GPU) order
    trainer_bundles: list[int]
    worker_bundles: list[int]
    master_addr: str
    master_port: int
    gpus_per_rank: float
    gpus_per_worker: float
    bundles: dict[str, list[BundleInfo]] = field(default_factory=dict)
    trainer_spec: list[dict] = field(default_factory=list)

    def fresh_master_port(self) -> int:
        """A port free now on rank 0's node, for a new rendezvous (the trainer restarted after
        a rank died: the old port may still be held by the dead group)."""
        index = self.trainer_bundles[0]
        (info,) = _probe_bundles(self.trainer_pg, [self.trainer_spec[index]], indices=[index])
        self.master_port = info.free_port
        return info.free_port

    def trainer_options(self, cfg: RlpostConfig, rank: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"num_cpus": cfg.trainer.threads, "num_gpus": self.gpus_per_rank,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.trainer_pg, placement_group_bundle_index=self.trainer_bundles[rank])}

    def worker_options(self, cfg: RlpostConfig, index: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # Ray restarts a dead worker in its bundle and re-runs its `run` loop there
        # (rollout.max_restarts); the new life serves its predecessor's unfinished items first.
        restarts = cfg.rollout.max_restarts
        return {"num_cpus": cfg.rollout.threads, "num_gpus": self.gpus_per_worker,
                "max_restarts": restarts, "max_task_retries": -1 if restarts else 0,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.worker_pg, placement_group_bundle_index=self.worker_bundles[index])}

    def weight_transport(self, configured: str) -> str:
        """The weight transport this placement allows: ``auto`` and ``shm`` (node-local shared
        memory) need every rollout worker on trainer rank 0's node, which publishes; elsewhere
        ``auto`` becomes ``ray`` and ``shm`` is refused."""
        if configured not in ("auto", "shm"):
            return configured
        home = self.bundles["trainer"][0]
        away = sorted({b.node_ip for b in self.bundles["workers"] if b.node_id != home.node_id})
        if not away:
            return configured
        if configured == "shm":
            raise PlacementError(f"trainer.weight_transport=shm needs every rollout worker on trainer rank 0's "
                                 f"node ({home.node_ip}); workers were placed on {', '.join(away)} "
                                 f"(use auto or ray)")
        return "ray"

    def describe(self) -> dict:
        """For the run dir's placement.json: which node (and GPUs) each bundle landed on."""
        return {"master": f"{self.master_addr}:{self.master_port}",
                "trainer": [vars(b) for b in self.bundles.get("trainer", [])],
                "workers": [vars(b) for b in self.bundles.get("workers", [])]}

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in {id(self.trainer_pg): self.trainer_pg, id(self.worker_pg): self.worker_pg}.values():
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass


def _probe() -> tuple[str, str, list[str], int]:
    """Run inside a bundle: this node's address and id, the GPUs Ray gave the bundle, and a TCP
    port free on this node (for rank 0's rendezvous)."""
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return (ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id(),
            [str(g) for g in ray.get_gpu_ids()], port)


def _probe_bundles(pg, bundles: list[dict], indices: list[int] | None = None) -> list[BundleInfo]:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    probe = ray.remote(_probe)
    indices = list(range(len(bundles))) if indices is None else indices
    refs = [probe.options(num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0),
                          scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
            .remote() for i, b in zip(indices, bundles)]
    return [BundleInfo(i, *seen) for i, seen in zip(indices, ray.get(refs))]


def _node_gpu_order(info: BundleInfo) -> tuple:
    gpu = min((int(g) for g in info.gpu_ids if str(g).isdigit()), default=-1)
    return (info.node_ip, info.node_id, gpu, info.index)


class PlacementError(RuntimeError):
    """The cluster cannot hold the run's bundles (the driver reports it in one line, exit 1)."""


def place(cfg: RlpostConfig, timeout_s: float = 120.0, fixed_cluster: bool = False) -> Placement:
    """Reserve the run's bundles and order them. Raises PlacementError naming what could not be
    placed (a cluster without the CPUs/GPUs asked for): at once on a ``fixed_cluster`` (a Ray
    the driver started on its own machine, which never grows) whose resources cannot hold the
    bundles, else after ``timeout_s`` (a cluster may add nodes meanwhile)."""
    import ray
    from ray.util.placement_group import placement_group

    t, r, p = cfg.trainer, cfg.rollout, cfg.placement
    gpus_per_rank = t.num_gpus / t.num_ranks if t.num_gpus else 0.0
    gpus_per_worker = float(cfg.engine.num_gpus)
    if p.colocate:
        shared_gpu = max(gpus_per_rank, gpus_per_worker)
        bundle = {"CPU": t.threads + r.threads, **({"GPU": shared_gpu} if shared_gpu else {})}
        trainer_bundles_spec = worker_bundles_spec = [dict(bundle) for _ in range(t.num_ranks)]
        gpus_per_rank = gpus_per_worker = shared_gpu / 2 if shared_gpu else 0.0
        groups = {"trainer": trainer_bundles_spec}
    else:
        trainer_bundles_spec = [{"CPU": t.threads, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
                                for _ in range(t.num_ranks)]
        worker_bundles_spec = [{"CPU": r.threads, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
                               for _ in range(r.num_workers)]
        groups = {"trainer": trainer_bundles_spec, "rollout": worker_bundles_spec}
    if fixed_cluster:
        _check_fits(cfg, groups, ray.cluster_resources())
    trainer_pg = placement_group(trainer_bundles_spec, strategy=p.strategy)
    worker_pg = trainer_pg if p.colocate else placement_group(worker_bundles_spec, strategy=p.strategy)
    for name, pg, spec in (("trainer", trainer_pg, trainer_bundles_spec), ("rollout", worker_pg, worker_bundles_spec)):
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise PlacementError(f"the cluster cannot hold the {name} bundles {spec} "
                                 f"(placement.strategy={p.strategy}) after {timeout_s:.0f}s; "
                                 f"cluster resources: {ray.cluster_resources()}")
    trainer_info = sorted(_probe_bundles(trainer_pg, trainer_bundles_spec), key=_node_gpu_order)
    worker_info = (trainer_info if p.colocate
                   else sorted(_probe_bundles(worker_pg, worker_bundles_spec), key=_node_gpu_order))
    return Placement(trainer_pg, worker_pg, [b.index for b in trainer_info], [b.index for b in worker_info],
                     master_addr=trainer_info[0].node_ip, master_port=trainer_info[0].free_port,
                     gpus_per_rank=gpus_per_rank, gpus_per_worker=gpus_per_worker,
                     bundles={"trainer": trainer_info, "workers": worker_info}, trainer_spec=trainer_bundles_spec)


def _check_fits(cfg: RlpostConfig, groups: dict[str, list[dict]], have: dict) -> None:
    """PlacementError if the bundles need more CPUs or GPUs in all than the cluster has, with
    the fields that asked for them."""
    fields = {"GPU": f"trainer.num_gpus={cfg.trainer.num_gpus}, engine.num_gpus={cfg.engine.num_gpus}",
              "CPU": f"trainer.threads={cfg.trainer.threads}, rollout.threads={cfg.rollout.threads}"}
    for resource, asked_by in fields.items():
        need = sum(b.get(resource, 0) for spec in groups.values() for b in spec)
        if need > have.get(resource, 0) + 1e-9:
            bundles = "; ".join(f"{name}: {spec}" for name, spec in groups.items())
            raise PlacementError(f"the run needs {need:g} {resource} in all ({asked_by}; bundles {bundles}) and "
                                 f"this machine's Ray has {have.get(resource, 0):g}"
                                 + (" (engine=sglang needs a GPU; on a CPU use engine=native or engine=vllm)"
                                    if resource == "GPU" else ""))


def where() -> dict:
    """Called inside an actor: where it runs (for placement.json and the multi-node test)."""
    import os

    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
