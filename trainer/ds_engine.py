"""DeepSpeed engine set-up for the MoE policy (CPU with gloo, or GPUs with NCCL).

Why a torch optimizer: DeepSpeed's own (FusedAdam / DeepSpeedCPUAdam) JIT-compiles C++ on first
use, ~50 s on a laptop; ``torch.optim.AdamW`` is what ZeRO-1/2 wrap just as well. Why the shm
stub: on CPU DeepSpeed JIT-builds a shared-memory all-reduce op (~40 s) that the trainer never
needs for its gradient all-reduce through gloo.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass

import torch

from rlpost.config import TrainerConfig


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def init_distributed(env: DistEnv) -> str:
    """Initialise torch.distributed through DeepSpeed; returns the device string for this rank."""
    # Ray gives each rank actor exactly its GPU(s) in CUDA_VISIBLE_DEVICES, so its device is
    # always the first visible one: LOCAL_RANK is 0, not the global rank (rank >= 1 on a node with
    # one visible GPU called set_device on a device it did not have).
    os.environ.update({
        "RANK": str(env.rank), "LOCAL_RANK": "0",
        "WORLD_SIZE": str(env.world_size), "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })
    import deepspeed

    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    ds_comm_torch.build_shm_op = lambda: None
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend, device = "nccl", f"cuda:{os.environ['LOCAL_RANK']}"
    else:
        backend, device = "gloo", "cpu"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return device


def resolve_precision(precision: str, device: str) -> str:
    if precision != "auto":
        return precision
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def effective_zero_stage(stage: int, world_size: int, precision: str) -> int:
    """The ZeRO stage the engine runs: 0 for a single fp32 rank, whatever ``trainer.zero_stage``
    says. ZeRO partitions optimizer state and gradients over ranks; with one rank there is
    nothing to partition, but stages 1/2 still flatten every gradient into buckets and reduce
    them each step (~13% of a toy warm-up step on one CPU thread) and DeepSpeed's ZeRO set-up
    imports torch's compiler stack (~1.7 s of every rank's start). bf16 keeps the configured
    stage: its stage-0 path is DeepSpeed's separate BF16_Optimizer, which has not run here."""
    return 0 if world_size == 1 and precision == "fp32" else stage


# written next to each DeepSpeed checkpoint by rank 0: what its files were laid out for
LAYOUT_FILE = "trainer_layout.json"
_LAYOUT_FIELDS = {"num_ranks": "trainer.num_ranks", "ep_size": "trainer.ep_size",
                  "zero_stage": "ZeRO stage", "precision": "trainer.precision"}


def layout_mismatch(saved: dict, current: dict) -> str | None:
    """Why a checkpoint saved by trainer ranks laid out as ``saved`` cannot be loaded by ranks
    laid out as ``current`` (None: it can). DeepSpeed's files are per rank, per expert-parallel
    slice and per ZeRO partitioning; loading them into another layout fails deep inside
    DeepSpeed or, between ZeRO stages, can skip the optimizer state without a word."""
    differ = [f"{label} {saved[k]} -> {current[k]}" for k, label in _LAYOUT_FIELDS.items()
              if k in saved and saved[k] != current[k]]
    if not differ:
        return None
    return (f"the checkpoint was saved by trainer ranks laid out differently ({', '.join(differ)}); "
            f"resume with the trainer settings it was saved with")


def _keep_grad_norm(engine) -> None:
    """ZeRO-1/2 keep each step's gradient norm (before clipping) for ``get_global_grad_norm``,
    which ``train/grad_norm`` and the non-finite check read; a stage-0 fp32 engine computes it
    while clipping and drops it (the metric read 0 at ``trainer.zero_stage=0``). The same
    clipping (DeepSpeed's, which averages the norm over ranks for expert parameters), the norm kept."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep() -> None:
        engine._global_grad_norm = float(clip_grad_norm_(parameters=engine.module.parameters(),
                                                         max_norm=engine.gradient_clipping(), mpu=engine.mpu))

    engine.clip_fp32_gradients = clip_and_keep


def build_engine(model: torch.nn.Module, cfg: TrainerConfig, lr: float, samples_per_step: int,
                 device: str, world_size: int):
    """Wrap ``model`` in a DeepSpeed engine with AdamW, ZeRO ``cfg.zero_stage`` and MoE param groups.

    Returns (engine, precision, grad_accum_steps). Every rank trains ``samples_per_step /
    world_size`` samples per step, in micro-batches of ``cfg.micro_batch_size`` (0: one). With
    ``cfg.max_tokens_per_micro_batch`` the number of micro-batches varies from step to step: the
    engine is built for one, and the trainer marks the accumulation boundary itself."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    precision = resolve_precision(cfg.precision, device)
    if precision in ("bf16", "fp16") and not device.startswith("cuda"):
        raise ValueError(f"trainer.precision={precision!r} needs a GPU; this rank runs on {device}")
    per_rank = max(1, samples_per_step // world_size)
    micro = per_rank if cfg.max_tokens_per_micro_batch else (cfg.micro_batch_size or per_rank)
    accum = max(1, -(-per_rank // micro))
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in model.parameters() if p.requires_grad], "name": "params",
         "weight_decay": cfg.weight_decay})
    # fused: one kernel over all tensors (CPU and CUDA); the per-tensor loop cost 0.15 s of a
    # 0.58 s warm-up step with a 152k vocabulary on one CPU thread
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  fused=True)
    stage = effective_zero_stage(cfg.zero_stage, world_size, precision)
    keep_norm = stage == 0 and precision == "fp32"  # DeepSpeed's fp32 stage-0 path drops the norm
    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        # no clipping there: an infinite limit, so the norm is still computed (_keep_grad_norm)
        "gradient_clipping": cfg.grad_clip or (math.inf if keep_norm else 0.0),
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    model.to(device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if keep_norm:
        _keep_grad_norm(engine)
    if world_size == 1 and stage == 0:
        # nothing to all-reduce with one rank, but DeepSpeed still flattens every gradient into a
        # bucket and back (0.05 s a step with a 152k vocabulary); ZeRO-1/2 need that path, 0 not
        engine.enable_backward_allreduce = False
    return engine, precision, accum
