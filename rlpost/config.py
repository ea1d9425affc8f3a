"""Typed configuration, mirrored by the hydra YAML under ``configs/``.

The dataclasses are registered as hydra's schema, so a wrong key or a value of the wrong type is
rejected while composing; ``validate()`` then checks ranges and cross-field rules. Both kinds of
error surface as :class:`ConfigError`, whose message names the field and the value.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from rlpost.tokenizer import TOKENIZERS

MODES = ("sync", "async", "april")
ENVS = ("arithmetic", "longtail", "coding", "tools", "dataset")
BUILTIN_TOOLS = ("calculator", "python")  # env.tools besides package.module:function (envs/chat_tools.py)
TOOL_FORMATS = ("auto", "hermes", "qwen3_coder", "glm45", "minimax_m2", "deepseek", "deepseek_v32")  # envs/tool_formats.py


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or out of range."""


def _check(cond: bool, key: str, value: Any, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {rule}")


@dataclass
class ModelConfig:
    """A Qwen3-MoE (Hugging Face ``qwen3_moe``), Mixtral (``mixtral``: no q/k norms, Mixtral's
    parameter names), GLM-4.5 MoE (``glm4_moe``: sigmoid routing with a score-correction bias,
    expert groups, a shared expert, dense first layers, q/k/v biases, partial rotary),
    DeepSeek-V3 (``deepseek_v3``: GLM's router and experts with multi-head latent attention) or
    GPT-OSS (``gpt_oss``: attention sinks, a sliding window on every other layer, biases on
    attention, router and experts, clamped SwiGLU experts) or MiniMax-M2 (``minimax_m2``: GLM's
    sigmoid router without groups, shared expert or dense layers, Mixtral's expert names, q/k
    norms over each whole projection, partial rotary) configuration; the defaults are a tiny
    Qwen3-MoE.
    ``vocab_size=0`` takes the environment tokenizer's size. ``path`` names a local Hugging Face
    checkpoint folder (``config.json`` + safetensors): its architecture replaces these fields and
    its weights are the starting point. The fields after ``init_std`` belong to some types only
    (:data:`TYPE_FIELDS`); the other types refuse values other than their defaults, naming the
    field. The ``rope_*`` fields after them (YaRN context extension) apply to every type."""

    type: str = "qwen3_moe"
    path: Optional[str] = None
    vocab_size: int = 0
    d_model: int = 64          # hidden_size
    n_layers: int = 2          # num_hidden_layers
    n_heads: int = 4           # num_attention_heads
    n_kv_heads: int = 2        # num_key_value_heads (grouped-query attention; deepseek_v3: = n_heads)
    head_dim: int = 32         # vLLM's CPU attention needs 32, 64, 80, 96, 112, 128, ... (unused by deepseek_v3)
    d_ff: int = 128            # moe_intermediate_size (each expert's SwiGLU width)
    num_experts: int = 4
    top_k: int = 2             # num_experts_per_tok
    max_seq_len: int = 64      # max_position_embeddings
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    aux_loss_coef: float = 0.01
    init_std: float = 0.02
    # glm4_moe and deepseek_v3: DeepSeek-V3's router and experts (config.json name after the colon)
    first_dense_layers: int = 0    # first_k_dense_replace: layers 0..n-1 have a dense MLP, no experts
    dense_d_ff: int = 0            # intermediate_size: the dense layers' SwiGLU width
    shared_experts: int = 0        # n_shared_experts: an always-on expert of width d_ff * this
    n_group: int = 1               # n_group: experts in groups; a token picks topk_group groups first
    topk_group: int = 1            # topk_group
    routed_scaling: float = 1.0    # routed_scaling_factor: multiplies the routed experts' weights
    norm_topk_prob: bool = True    # norm_topk_prob: renormalise the top-k weights to sum to 1
    # glm4_moe only
    attention_bias: bool = False   # attention_bias: q/k/v projections with biases
    qk_norm: bool = False          # use_qk_norm (qwen3_moe and minimax_m2 always have it, mixtral never)
    # glm4_moe and minimax_m2
    partial_rotary: float = 1.0    # partial_rotary_factor (minimax_m2: rotary_dim / head_dim): share of each head's dims that rotate
    # deepseek_v3 only: multi-head latent attention (keys and values from one low-rank latent)
    q_lora_rank: int = 0           # q_lora_rank: queries through a rank-r bottleneck (0: null, a full q_proj)
    kv_lora_rank: int = 0          # kv_lora_rank: the latent keys and values are expanded from
    qk_nope_head_dim: int = 0      # qk_nope_head_dim: each head's key/query dims without rotary
    qk_rope_head_dim: int = 0      # qk_rope_head_dim: the rotary dims (one rotary key shared by all heads)
    v_head_dim: int = 0            # v_head_dim: each head's value width
    # gpt_oss only (its attention sinks, biases and clamped SwiGLU come with the type)
    sliding_window: int = 0        # sliding_window: layers 0, 2, 4, ... attend to this many latest tokens
    # every type: YaRN context extension (config.json rope_scaling / rope_parameters)
    rope_type: str = "default"     # rope_type: default | yarn
    rope_factor: float = 1.0       # factor: context-length multiple over the original
    rope_original_max_len: int = 0  # original_max_position_embeddings
    rope_beta_fast: float = 32.0   # beta_fast / beta_slow: YaRN's ramp between interpolated and
    rope_beta_slow: float = 1.0    # extrapolated frequencies
    rope_mscale: float = 0.0       # mscale / mscale_all_dim (deepseek_v3; 0: unset): attention
    rope_mscale_all_dim: float = 0.0  # temperature from log(factor)
    rope_truncate: bool = True     # truncate: round YaRN's ramp ends to whole dimensions (GPT-OSS: false)

    @property
    def moe_layers(self) -> int:
        """Layers with experts (the rest are the first dense ones): the routing every engine
        reports and the trainer replays is (tokens, moe_layers, top_k)."""
        return self.n_layers - self.first_dense_layers

    @property
    def sigmoid_router(self) -> bool:
        """DeepSeek-V3's router (sigmoid scores, correction bias, groups, scaling): glm4_moe,
        deepseek_v3 and minimax_m2 (one group, no scaling). The other types route by softmax top-k."""
        return self.type in ("glm4_moe", "deepseek_v3", "minimax_m2")

    @property
    def projection_qk_norm(self) -> bool:
        """MiniMax-M2's q/k norms (``qk_norm_type: per_layer``): one RMSNorm over each token's whole
        query projection (all heads, a weight per element) and one over its keys, before the
        heads are split, where Qwen3's and GLM's normalise each head alone."""
        return self.type == "minimax_m2"

    @property
    def latent_attention(self) -> bool:
        """Multi-head latent attention (deepseek_v3) instead of grouped-query attention."""
        return self.type == "deepseek_v3"

    @property
    def oai_blocks(self) -> bool:
        """GPT-OSS's blocks (gpt_oss): attention with learned sinks and biases on q/k/v/o, a
        sliding window on even layers, a router with a bias, experts with biases and the clamped
        SwiGLU (``swiglu_limit`` 7, alpha 1.702, the ``up + 1`` term)."""
        return self.type == "gpt_oss"

    def layer_window(self, index: int) -> int:
        """Tokens layer ``index`` attends to (0: all): GPT-OSS's even layers are sliding-window
        ones (config.json ``layer_types``: sliding, full, sliding, ...; vLLM assumes the same)."""
        return self.sliding_window if self.oai_blocks and index % 2 == 0 else 0

    @property
    def rotary_dim(self) -> int:
        return self.qk_rope_head_dim if self.latent_attention else int(self.head_dim * self.partial_rotary)

    def validate(self, p: str = "model") -> None:
        _check(self.type in MODEL_TYPES, f"{p}.type", self.type, f"supported: {', '.join(MODEL_TYPES)}")
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "num_experts",
                     "max_seq_len"):
            _check(getattr(self, name) > 0, f"{p}.{name}", getattr(self, name), "must be > 0")
        _check(self.vocab_size >= 0, f"{p}.vocab_size", self.vocab_size, "must be >= 0 (0 = tokenizer's)")
        _check(self.n_heads % self.n_kv_heads == 0, f"{p}.n_heads", self.n_heads,
               f"must be a multiple of model.n_kv_heads={self.n_kv_heads}")
        _check(self.head_dim % 2 == 0 or self.latent_attention, f"{p}.head_dim", self.head_dim,
               "must be even (rotary embedding)")
        _check(self.top_k >= 1, f"{p}.top_k", self.top_k, "must be >= 1")
        own = TYPE_FIELDS.get(self.type, ())
        for name in sorted(set().union(*TYPE_FIELDS.values()) - set(own)):
            default = getattr(ModelConfig, name)
            owners = " or ".join(t for t, names in TYPE_FIELDS.items() if name in names)
            _check(getattr(self, name) == default, f"{p}.{name}", getattr(self, name),
                   f"only model.type={owners} has it ({self.type} needs {default!r})")
        if self.sigmoid_router:
            self._validate_router(p)
        if self.type in ("glm4_moe", "minimax_m2"):
            _check(0 < self.partial_rotary <= 1 and self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
                   f"{p}.partial_rotary", self.partial_rotary,
                   f"must be in (0, 1] and leave an even rotary width of model.head_dim={self.head_dim}")
        if self.latent_attention:
            self._validate_latent_attention(p)
        if self.oai_blocks:
            _check(self.sliding_window > 0, f"{p}.sliding_window", self.sliding_window, "must be > 0 (gpt_oss)")
            _check(self.rope_type == "yarn", f"{p}.rope_type", self.rope_type,
                   "gpt_oss needs yarn (GPT-OSS's rotary; vLLM builds no other for it)")
            _check(self.rms_norm_eps == 1e-5, f"{p}.rms_norm_eps", self.rms_norm_eps,
                   "gpt_oss needs 1e-05 (GPT-OSS's; vLLM's GPT-OSS fixes it)")
        self._validate_rope(p)
        _check(self.top_k <= self.num_experts, f"{p}.top_k", self.top_k,
               f"must be <= model.num_experts={self.num_experts}")
        _check(self.rope_theta > 0, f"{p}.rope_theta", self.rope_theta, "must be > 0")
        _check(self.rms_norm_eps > 0, f"{p}.rms_norm_eps", self.rms_norm_eps, "must be > 0")
        _check(self.aux_loss_coef >= 0, f"{p}.aux_loss_coef", self.aux_loss_coef, "must be >= 0")

    def _validate_router(self, p: str) -> None:
        _check(0 <= self.first_dense_layers < self.n_layers, f"{p}.first_dense_layers", self.first_dense_layers,
               f"must be in [0, model.n_layers={self.n_layers}) (at least one layer with experts)")
        _check(self.first_dense_layers == 0 or self.dense_d_ff > 0, f"{p}.dense_d_ff", self.dense_d_ff,
               f"must be > 0 with model.first_dense_layers={self.first_dense_layers}")
        _check(self.shared_experts >= 0, f"{p}.shared_experts", self.shared_experts, "must be >= 0")
        _check(self.n_group >= 1 and self.num_experts % self.n_group == 0, f"{p}.n_group", self.n_group,
               f"must divide model.num_experts={self.num_experts}")
        _check(self.n_group == 1 or self.num_experts // self.n_group >= 2, f"{p}.n_group", self.n_group,
               "groups are scored by their two best experts: at least 2 experts per group")
        _check(1 <= self.topk_group <= self.n_group, f"{p}.topk_group", self.topk_group,
               f"must be in [1, model.n_group={self.n_group}]")
        _check(self.top_k <= self.topk_group * (self.num_experts // self.n_group), f"{p}.top_k", self.top_k,
               f"must be <= the experts in model.topk_group={self.topk_group} groups")
        _check(self.routed_scaling > 0, f"{p}.routed_scaling", self.routed_scaling, "must be > 0")

    def _validate_latent_attention(self, p: str) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _check(getattr(self, name) > 0, f"{p}.{name}", getattr(self, name), "must be > 0 (deepseek_v3)")
        _check(self.q_lora_rank >= 0, f"{p}.q_lora_rank", self.q_lora_rank, "must be >= 0 (0: a full q_proj)")
        _check(self.qk_rope_head_dim % 2 == 0, f"{p}.qk_rope_head_dim", self.qk_rope_head_dim,
               "must be even (rotary embedding)")
        _check(self.n_kv_heads == self.n_heads, f"{p}.n_kv_heads", self.n_kv_heads,
               f"must be model.n_heads={self.n_heads}: latent attention expands keys and values per head")

    def _validate_rope(self, p: str) -> None:
        _check(self.rope_type in ROPE_TYPES, f"{p}.rope_type", self.rope_type, f"supported: {', '.join(ROPE_TYPES)}")
        if self.rope_type == "default":
            for name in ("rope_factor", "rope_original_max_len", "rope_beta_fast", "rope_beta_slow",
                         "rope_mscale", "rope_mscale_all_dim", "rope_truncate"):
                _check(getattr(self, name) == getattr(ModelConfig, name), f"{p}.{name}", getattr(self, name),
                       "applies with model.rope_type=yarn only")
            return
        _check(self.rope_factor >= 1, f"{p}.rope_factor", self.rope_factor, "must be >= 1")
        _check(self.rope_original_max_len > 0, f"{p}.rope_original_max_len", self.rope_original_max_len,
               "must be > 0 with model.rope_type=yarn (original_max_position_embeddings)")
        _check(self.rope_beta_fast > self.rope_beta_slow > 0, f"{p}.rope_beta_fast", self.rope_beta_fast,
               f"must be > model.rope_beta_slow={self.rope_beta_slow} > 0")
        _check(self.rope_mscale >= 0 and self.rope_mscale_all_dim >= 0, f"{p}.rope_mscale", self.rope_mscale,
               "mscale and mscale_all_dim must be >= 0")


MODEL_TYPES = ("qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3", "gpt_oss", "minimax_m2")
ROPE_TYPES = ("default", "yarn")
_ROUTER_FIELDS = ("first_dense_layers", "dense_d_ff", "shared_experts", "n_group", "topk_group",
                  "routed_scaling", "norm_topk_prob")
# model.type -> the ModelConfig fields only it may set to other than their defaults
TYPE_FIELDS = {
    "glm4_moe": (*_ROUTER_FIELDS, "attention_bias", "qk_norm", "partial_rotary"),
    "deepseek_v3": (*_ROUTER_FIELDS, "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "rope_mscale", "rope_mscale_all_dim"),
    "gpt_oss": ("sliding_window",),
    "minimax_m2": ("partial_rotary",),
}


@dataclass
class EngineConfig:
    """Inference engine for rollout workers."""

    name: str = "native"
    # Tokens generated between checks for new weights / stop signals (the APRIL chunk).
    chunk_tokens: int = 8
    max_batch_size: int = 512
    dtype: str = "float32"
    # Keep the KV cache of a stopped generation (an APRIL cut, a weight swap) and continue from
    # it when the same sample comes back to this engine, instead of prefilling its tokens again.
    # The resumed tokens are sampled by the new weights over keys/values the older weights
    # computed (PipelineRL's in-flight update); their logprobs are the true sampling ones and the
    # trainer's importance correction sees the difference. false: recompute (exact context).
    reuse_kv: bool = False
    # vLLM / SGLang: KV cache size on CPU (GiB; VLLM_CPU_KVCACHE_SPACE), share of GPU memory,
    # prefix caching (reset at every weight update), CUDA graphs off (enforce_eager) by default,
    # and the routed experts per token where the engine returns them.
    kv_cache_gb: int = 1
    gpu_memory_utilization: float = 0.3
    prefix_caching: bool = True
    enforce_eager: bool = True
    return_routed_experts: bool = False
    # GPUs each rollout worker asks Ray for (its engine's); 0 on CPU. vLLM/SGLang on GPUs:
    # engine.tensor_parallel_size.
    num_gpus: float = 0.0
    # Devices one vLLM/SGLang engine spans (slime's --rollout-num-gpus-per-engine, OpenRLHF's
    # --vllm_tensor_parallel_size): vLLM's tensor_parallel_size (its workers in their own
    # processes, one per GPU, or per CPU share on CPU), SGLang's tp_size. expert_parallel: the MoE
    # layers split by experts over those devices instead of by columns (vLLM's
    # enable_expert_parallel, SGLang's ep_size = tp_size); attention stays tensor-parallel.
    tensor_parallel_size: int = 1
    expert_parallel: bool = False

    def validate(self, p: str = "engine") -> None:
        _check(self.name in ("native", "vllm", "sglang"), f"{p}.name", self.name,
               "must be one of native, vllm, sglang")
        _check(self.chunk_tokens > 0, f"{p}.chunk_tokens", self.chunk_tokens, "must be > 0")
        _check(self.max_batch_size > 0, f"{p}.max_batch_size", self.max_batch_size, "must be > 0")
        _check(self.dtype in ("float32", "bfloat16", "float16"), f"{p}.dtype", self.dtype,
               "must be float32, bfloat16 or float16")
        _check(self.kv_cache_gb > 0, f"{p}.kv_cache_gb", self.kv_cache_gb, "must be > 0")
        _check(0 < self.gpu_memory_utilization <= 1, f"{p}.gpu_memory_utilization",
               self.gpu_memory_utilization, "must be in (0, 1]")
        _check(self.num_gpus >= 0, f"{p}.num_gpus", self.num_gpus, "must be >= 0")
        tp = self.tensor_parallel_size
        _check(tp >= 1, f"{p}.tensor_parallel_size", tp, "must be >= 1")
        _check(tp == 1 or self.name != "native", f"{p}.tensor_parallel_size", tp,
               "the native engine runs on one device: use engine=vllm or engine=sglang to split a model")
        _check(self.num_gpus == 0 or self.num_gpus == tp or (tp == 1 and self.num_gpus < 1),
               f"{p}.num_gpus", self.num_gpus,
               f"must be 0 (CPU) or engine.tensor_parallel_size={tp} (one GPU per tensor-parallel rank)")
        _check(not self.expert_parallel or tp > 1, f"{p}.expert_parallel", True,
               "needs engine.tensor_parallel_size > 1 (the experts are split over the engine's devices)")
        _check(not (self.reuse_kv and self.name != "native"), f"{p}.reuse_kv", self.reuse_kv,
               "KV retention across stops is a native-engine feature (vLLM/SGLang use prefix caching)")


@dataclass
class RolloutConfig:
    num_workers: int = 1
    # Prompts per training step; each is answered by a GRPO group of group_size samples.
    batch_prompts: int = 16
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    # Torch threads per worker actor (keep workers + trainer <= cores on a laptop).
    threads: int = 1
    # april: keep over_sampling x batch_prompts groups in flight.
    over_sampling: float = 1.0
    # async/april: no trained token is older than this many weight versions (AReaL's eta).
    max_staleness: int = 1
    # APRIL: a group resumed this often is no longer parked at round cuts; it runs to the end.
    max_resumes: int = 4
    # A rollout worker that dies (killed, OOM, node lost) is restarted by Ray this many times; the
    # new life first serves the items its previous life read and never finished (same consumer
    # name, deterministic trajectory ids: nothing lost, nothing trained twice). 0: the run fails.
    max_restarts: int = 3
    # DAPO's dynamic sampling: a group whose samples all got the same reward has zero advantage
    # everywhere (it only dilutes the batch); the trainer drops it and the driver submits a new
    # prompt in its place, so every step trains batch_prompts groups that teach something.
    filter_uniform_groups: bool = False
    # ... at most this many batches' worth of groups dropped per step; past that (a task the
    # policy always or never solves) uniform groups are trained as they are instead of
    # generating forever.
    filter_max_batches: float = 4.0

    def validate(self, p: str = "rollout") -> None:
        for name in ("num_workers", "batch_prompts", "group_size", "max_new_tokens", "threads"):
            _check(getattr(self, name) > 0, f"{p}.{name}", getattr(self, name), "must be > 0")
        _check(self.temperature >= 0, f"{p}.temperature", self.temperature, "must be >= 0")
        _check(0 < self.top_p <= 1, f"{p}.top_p", self.top_p, "must be in (0, 1]")
        _check(self.over_sampling >= 1, f"{p}.over_sampling", self.over_sampling, "must be >= 1")
        _check(self.max_staleness >= 0, f"{p}.max_staleness", self.max_staleness, "must be >= 0")
        _check(self.max_resumes >= 0, f"{p}.max_resumes", self.max_resumes, "must be >= 0")
        _check(self.max_restarts >= 0, f"{p}.max_restarts", self.max_restarts, "must be >= 0")
        # finite: the trainer takes ceil(filter_max_batches x its share of the batch) as its budget
        _check(0 <= self.filter_max_batches < float("inf"), f"{p}.filter_max_batches", self.filter_max_batches,
               "must be a finite number >= 0")
        _check(self.group_size >= 2, f"{p}.group_size", self.group_size,
               "must be >= 2 (GRPO normalises each reward against its group: one sample has no baseline)")


# rlpost/weights.py: auto (shm on one node, else ray), node-local shared memory, Ray's object
# store, safetensors files
WEIGHT_TRANSPORTS = ("auto", "shm", "ray", "file")
# trainer/losses.py's choices, named once for the loss and for these checks
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_norm")
RATIO_LEVELS = ("token", "sequence")
IS_LEVELS = ("auto", "token", "geometric", "sequence")
OFF_POLICY_CORRECTIONS = ("tis", "decoupled", "mask_stale", "ppo")


def is_reward_range(values: Any) -> bool:
    """``(low, high)``: two finite numbers, low < high (a config's or an env's reward range)."""
    try:
        low, high = (float(v) for v in values)
    except (TypeError, ValueError):
        return False
    return math.isfinite(low) and math.isfinite(high) and low < high


def _either(names: tuple[str, ...]) -> str:
    """``a, b or c``."""
    return f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass
class TrainerConfig:
    """DeepSpeed trainer and RL loss."""

    steps: int = 100
    lr: float = 1e-3
    # RL learning-rate schedule (trainer/lr_schedule.py): linear warm-up over lr_warmup_steps,
    # then constant, linear or cosine decay to min_lr_ratio x lr at trainer.steps.
    lr_warmup_steps: int = 0
    lr_decay: str = "constant"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    micro_batch_size: int = 0  # 0: the whole step in one micro-batch
    # > 0: micro-batches by tokens instead (slime's --max-tokens-per-gpu, verl's
    # ppo_max_token_len_per_gpu): each rank's sequences go into as few micro-batches of at most
    # this many tokens (prompt + response) as fit, the same number on every rank; bounds a
    # micro-batch's activation memory whatever the response lengths. Must be >= model.max_seq_len.
    max_tokens_per_micro_batch: int = 0
    # Pack each micro-batch's sequences into rows of model.max_seq_len tokens (attention kept
    # inside each sequence) instead of padding every row to the longest one.
    pack_sequences: bool = True
    zero_stage: int = 1
    precision: str = "auto"  # auto: bf16 on GPUs that support it, fp32 on CPU
    num_ranks: int = 1
    # Expert parallelism: each group of ep_size ranks splits every layer's experts between them
    # (DeepSpeed MoE); published and saved weights always carry all experts under HF names.
    ep_size: int = 1
    num_gpus: int = 0
    threads: int = 1
    # PPO-clip with per-token truncated importance sampling against behaviour logprobs.
    clip_eps: float = 0.2
    clip_eps_high: float = 0.28
    tis_cap: float = 2.0
    # dual-clip PPO: > 1 caps a negative-advantage token's loss at -A x clip_ratio_c (verl's
    # clip_ratio_c=3); 0: off
    clip_ratio_c: float = 0.0
    # DAPO's overlong filtering: samples cut at rollout.max_new_tokens train no tokens (their
    # reward still counts in their group's baseline)
    mask_truncated: bool = False
    kl_coef: float = 0.0
    # Entropy bonus: the loss subtracts entropy_coef x the mean token entropy (train/entropy is
    # logged every step either way).
    entropy_coef: float = 0.0
    # grpo | rloo | reinforce_pp_baseline (trainer/losses.py advantages); adv_std_norm is grpo's
    # division by the group's std (off: Dr. GRPO)
    advantage: str = "grpo"
    adv_std_norm: bool = True
    # token_mean (DAPO) | seq_mean (GRPO paper, GSPO) | seq_sum_norm (Dr. GRPO: token sum over
    # sequences x rollout.max_new_tokens)
    loss_agg: str = "token_mean"
    # token: PPO-clip on per-token ratios (GRPO, DAPO). sequence: GSPO, one ratio per sequence
    # (the geometric mean of its tokens'), clipped as a whole: use clip ranges of ~3e-4/4e-4 and
    # loss_agg=seq_mean (trainer/losses.py)
    ratio_level: str = "token"
    # Off-policy correction: tis | decoupled | mask_stale | ppo (see trainer/losses.py).
    off_policy: str = "tis"
    # The level of tis/decoupled's weight old/behav (verl's rollout correction): auto (the
    # ratio_level's: token, or geometric for sequence) | token | geometric (a sequence's
    # geometric mean) | sequence (the product over the sequence, truncated or masked at tis_cap)
    is_level: str = "auto"
    # tis/decoupled: mask tokens (sequences, at those levels) whose weight is below this
    # (IcePop's lower bound, e.g. 0.5); 0: off
    is_floor: float = 0.0
    # tis/decoupled: drop every token of a sequence with any token whose weight is below this
    # (verl's veto, e.g. 1e-4: the engine sampled what the trainer finds near-impossible); 0: off
    is_veto: float = 0.0
    # Optimiser steps per batch; > 1 recomputes the proximal policy before the first one.
    ppo_minibatches: int = 1
    # Rollout routing replay (R3): every trainer forward (policy, proximal, KL reference) routes
    # each response token's hidden state through the experts the engine used for it, instead of
    # the trainer's own router (which can disagree: bf16 engine vs fp32 trainer, another kernel,
    # older weights). Needs the engine's routing (native: always; vLLM/SGLang:
    # engine.return_routed_experts). Prompt tokens keep the trainer's routing.
    routing_replay: bool = False
    publish_every: int = 1
    checkpoint_every: int = 0
    # auto: node-local shared memory when every worker is on rank 0's node, else Ray's object
    # store | shm | ray | file (rlpost/weights.py)
    weight_transport: str = "auto"
    # Steps in a row with a non-finite loss or gradient norm before the run stops (exit code 1).
    max_nonfinite_steps: int = 3
    # A trainer rank that dies is restarted (all ranks, from the latest checkpoint: needs
    # checkpoint_every > 0) this many times per run; the buffer is kept as it is.
    max_restarts: int = 2

    def validate(self, p: str = "trainer") -> None:
        _check(self.steps >= 0, f"{p}.steps", self.steps, "must be >= 0")
        _check(self.lr > 0, f"{p}.lr", self.lr, "must be > 0")
        _check(0 <= self.lr_warmup_steps <= max(self.steps, 0), f"{p}.lr_warmup_steps", self.lr_warmup_steps,
               f"must be in [0, trainer.steps={self.steps}]")
        _check(self.lr_decay in ("constant", "linear", "cosine"), f"{p}.lr_decay", self.lr_decay,
               "must be constant, linear or cosine")
        _check(0 <= self.min_lr_ratio <= 1, f"{p}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{p}.betas", self.betas,
               "must be two numbers in [0, 1)")
        _check(self.zero_stage in (0, 1, 2), f"{p}.zero_stage", self.zero_stage,
               "must be 0, 1 or 2 (ZeRO-3 does not support DeepSpeed MoE here)")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"), f"{p}.precision", self.precision,
               "must be auto, fp32, bf16 or fp16")
        _check(self.num_ranks >= 1, f"{p}.num_ranks", self.num_ranks, "must be >= 1")
        _check(self.ep_size >= 1 and self.num_ranks % self.ep_size == 0, f"{p}.ep_size", self.ep_size,
               f"must divide trainer.num_ranks={self.num_ranks}")
        _check(self.num_gpus >= 0, f"{p}.num_gpus", self.num_gpus, "must be >= 0")
        _check(self.micro_batch_size >= 0, f"{p}.micro_batch_size", self.micro_batch_size, "must be >= 0")
        _check(self.max_tokens_per_micro_batch >= 0, f"{p}.max_tokens_per_micro_batch",
               self.max_tokens_per_micro_batch, "must be >= 0 (0: off)")
        _check(self.max_tokens_per_micro_batch == 0 or self.micro_batch_size == 0, f"{p}.max_tokens_per_micro_batch",
               self.max_tokens_per_micro_batch,
               f"micro-batches by tokens or by samples, not both (trainer.micro_batch_size={self.micro_batch_size})")
        _check(0 < self.clip_eps < 1, f"{p}.clip_eps", self.clip_eps, "must be in (0, 1)")
        _check(self.clip_eps_high >= self.clip_eps, f"{p}.clip_eps_high", self.clip_eps_high,
               f"must be >= trainer.clip_eps={self.clip_eps}")
        _check(self.tis_cap >= 1, f"{p}.tis_cap", self.tis_cap, "must be >= 1")
        _check(self.clip_ratio_c == 0 or 1 + self.clip_eps_high < self.clip_ratio_c < float("inf"),
               f"{p}.clip_ratio_c", self.clip_ratio_c,
               f"must be 0 (off) or a finite number above 1 + trainer.clip_eps_high={1 + self.clip_eps_high:g}")
        _check(self.kl_coef >= 0, f"{p}.kl_coef", self.kl_coef, "must be >= 0")
        _check(0 <= self.entropy_coef < float("inf"), f"{p}.entropy_coef", self.entropy_coef, "must be a finite number >= 0")
        _check(self.loss_agg in LOSS_AGGREGATIONS, f"{p}.loss_agg", self.loss_agg,
               f"must be {_either(LOSS_AGGREGATIONS)}")
        _check(self.advantage in ADVANTAGE_ESTIMATORS, f"{p}.advantage", self.advantage,
               f"must be {_either(ADVANTAGE_ESTIMATORS)}")
        _check(self.ratio_level in RATIO_LEVELS, f"{p}.ratio_level", self.ratio_level,
               f"must be {_either(RATIO_LEVELS)} (GSPO)")
        _check(self.off_policy in OFF_POLICY_CORRECTIONS, f"{p}.off_policy", self.off_policy,
               f"must be {_either(OFF_POLICY_CORRECTIONS)}")
        _check(self.is_level in IS_LEVELS, f"{p}.is_level", self.is_level, f"must be {_either(IS_LEVELS)}")
        for name in ("is_floor", "is_veto"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"{p}.{name}", value, "must be in [0, 1) (0: off)")
            _check(value == 0 or self.off_policy in ("tis", "decoupled"), f"{p}.{name}", value,
                   f"needs trainer.off_policy=tis or decoupled (trainer.off_policy={self.off_policy} weighs "
                   f"no token by old/behav)")
        _check(self.is_level == "auto" or self.off_policy in ("tis", "decoupled"), f"{p}.is_level", self.is_level,
               f"needs trainer.off_policy=tis or decoupled (trainer.off_policy={self.off_policy} weighs "
               f"no token by old/behav)")
        _check(self.ppo_minibatches >= 1, f"{p}.ppo_minibatches", self.ppo_minibatches, "must be >= 1")
        _check(self.publish_every >= 1, f"{p}.publish_every", self.publish_every, "must be >= 1")
        _check(self.checkpoint_every >= 0, f"{p}.checkpoint_every", self.checkpoint_every, "must be >= 0")
        _check(self.weight_transport in WEIGHT_TRANSPORTS, f"{p}.weight_transport",
               self.weight_transport, f"must be one of {', '.join(WEIGHT_TRANSPORTS)}")
        _check(self.max_restarts >= 0, f"{p}.max_restarts", self.max_restarts, "must be >= 0")
        _check(self.max_nonfinite_steps >= 1, f"{p}.max_nonfinite_steps", self.max_nonfinite_steps, "must be >= 1")


@dataclass
class WarmupConfig:
    """Supervised warm-up before RL, cached by a hash of everything that determines it."""

    steps: int = 200
    lr: float = 3e-3
    batch_size: int = 64
    # null: <run_dir>/warmup. Point several runs at one folder to share the warm-up.
    cache_dir: Optional[str] = None

    def validate(self, p: str = "warmup") -> None:
        _check(self.steps >= 0, f"{p}.steps", self.steps, "must be >= 0")
        _check(self.lr > 0, f"{p}.lr", self.lr, "must be > 0")
        _check(self.batch_size > 0, f"{p}.batch_size", self.batch_size, "must be > 0")


@dataclass
class EnvConfig:
    name: str = "arithmetic"
    # Arithmetic: operand digits and operators.
    min_digits: int = 1
    max_digits: int = 2
    ops: list[str] = field(default_factory=lambda: ["+"])
    # Write the answer's digits least-significant first (easier for small transformers).
    reverse_answer: bool = False
    # Fraction of carrying additions whose warm-up demonstration drops the carry (a flawed teacher).
    teacher_carry_error: float = 0.0
    # tools: fraction of warm-up demonstrations where the teacher answers without the calculator
    # (rightly: it multiplies in its head; the toy cannot), a flawed habit for RL to unlearn.
    teacher_skips_tool: float = 0.0
    # longtail: log-normal target lengths (median, shape) capped at len_max.
    len_median: float = 6.0
    len_sigma: float = 1.1
    len_max: int = 120
    # tools, and dataset with env.tools: tool turns allowed per sample.
    max_turns: int = 3
    # dataset: tools the model may call in its checkpoint's chat format (rlpost/envs/chat_tools.py):
    # calculator, python (sandboxed) or package.module:function (yours); their schemas go to the
    # chat template, calls are parsed in tool_format (auto: the syntax the template renders calls
    # in; hermes: Qwen's <tool_call>{json}</tool_call>; qwen3_coder, glm45, minimax_m2: those
    # families' XML; deepseek: V3.1's and R1's tool-call tokens; deepseek_v32: V3.2's DSML;
    # envs/tool_formats.py), each
    # result cut to tool_output_chars; the final turn
    # (no call) is what the reward scores.
    tools: list[str] = field(default_factory=list)
    tool_format: str = "auto"
    tool_output_chars: int = 2000
    # Tokenizer of the env's text: char (the toy envs' alphabets), gpt2 or qwen3 (byte-level BPE),
    # qwen3_chat (Qwen3's, prompts as a ChatML user turn, eos <|im_end|>: instruct checkpoints),
    # mixtral (SentencePiece, 32k ids), hf (a Hugging Face checkpoint's own, below); the real ones
    # for coding, arithmetic, dataset and your own envs. auto: hf when model.path holds tokenizer
    # files and the env takes a real tokenizer, else char (resolved at start-up).
    tokenizer: str = "auto"
    # hf: the folder with tokenizer.json / tokenizer_config.json (null: model.path). Prompts go
    # through its chat template (chat_template=true) as a user turn after system_prompt (if set),
    # with chat_template_kwargs passed to the template (Qwen3: {enable_thinking: false});
    # eos_token overrides the tokenizer's eos (the token that ends a response).
    tokenizer_path: Optional[str] = None
    chat_template: bool = True
    system_prompt: Optional[str] = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    eos_token: Optional[str] = None
    # coding: the eval set, toy (procedural, held out) or humaneval (the 164 HumanEval problems,
    # up to env.num_eval of them; needs a real tokenizer), and its completion budget (0: the set's
    # default, 13 for toy, 300 for humaneval; dataset: the longest warm-up target + 1).
    eval_set: str = "toy"
    eval_max_new_tokens: int = 0
    num_eval: int = 200
    # dataset (rlpost/envs/dataset.py): your JSONL prompts and reference answers, the keys that
    # hold them (and an optional warm-up target), a template around each prompt, and the reward:
    # math (final-answer equivalence), exact, or package.module:function (your verifier).
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    # more held-out sets, {name: path} (same keys; up to num_eval records each), evaluated with the
    # main one and reported as eval/<name>/accuracy (and pass@k), answers in evals/<tag>.<name>.jsonl
    eval_sets: dict[str, str] = field(default_factory=dict)
    # drop (and count) the records whose prompt leaves no room for the completion budget in
    # model.max_seq_len, instead of refusing the run (verl's filter_overlong_prompts)
    filter_long_prompts: bool = False
    # record fields a custom verifier with a third parameter gets as {key: value} (verl's extra_info)
    extra_keys: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    sft_key: Optional[str] = None
    prompt_template: str = "{prompt}"
    reward: str = "math"
    # The math and exact verifiers (and env=coding's program extraction) read only what follows
    # the reasoning (the last </think>), and a response whose reasoning never ended scores 0:
    # auto when the tokenizer has <think> and </think> tokens (Qwen3, DeepSeek-R1/V3.1, GLM-4.5),
    # think (require them); harmony (GPT-OSS; auto when it has <|channel|> and <|message|>
    # tokens): the last message, on the final channel; none (the whole text). envs/reasoning.py
    reasoning: str = "auto"
    reward_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    seed: int = 1234
    reward_timeout_s: float = 5.0
    # Groups a rollout worker scores at once, on threads beside generation (sandboxed programs
    # of one group run concurrently as well, up to sandbox.slots).
    reward_workers: int = 4
    # DAPO's soft overlong punishment: a training sample whose response runs into the last
    # overlong_buffer tokens of rollout.max_new_tokens loses up to overlong_penalty of its reward,
    # linearly (the whole of it at the limit); 0 tokens: off. Evaluation is never penalised.
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # Settings of your own env (env.name=package.module:Factory reads them from cfg.options)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def takes_real_tokenizer(self) -> bool:
        """The envs that work on a real tokenizer's text (the others on their own alphabet)."""
        return ":" in self.name or self.name in ("coding", "arithmetic", "dataset")

    def validate(self, p: str = "env") -> None:
        custom = ":" in self.name
        _check(self.name in ENVS or (custom and all(self.name.split(":", 1))), f"{p}.name", self.name,
               f"available: {', '.join(ENVS)}, or your own as package.module:Factory")
        _check(self.max_turns >= 1, f"{p}.max_turns", self.max_turns, "must be >= 1")
        _check(self.tokenizer in TOKENIZERS, f"{p}.tokenizer", self.tokenizer, f"must be one of {', '.join(TOKENIZERS)}")
        _check(self.tokenizer in ("char", "auto") or self.takes_real_tokenizer, f"{p}.tokenizer",
               self.tokenizer, f"env.name={self.name} works on its character alphabet; real tokenizers are for "
               f"the coding, arithmetic and dataset envs")
        if self.name == "dataset":
            _check(bool(self.train_path), f"{p}.train_path", self.train_path,
                   "env.name=dataset needs a JSONL file of prompts and answers")
            _check("{prompt}" in self.prompt_template, f"{p}.prompt_template", self.prompt_template,
                   "must contain {prompt}")
            _check(self.reward in ("math", "exact") or (":" in self.reward and all(self.reward.split(":", 1))),
                   f"{p}.reward", self.reward, "must be math, exact or package.module:function")
            _check(self.reasoning in ("auto", "none") or self.reward in ("math", "exact"), f"{p}.reasoning", self.reasoning,
                   "applies to the math and exact verifiers (a custom verifier gets the whole response)")
        _check(self.reasoning in ("auto", "think", "harmony", "none"), f"{p}.reasoning", self.reasoning,
               "must be auto, think, harmony or none")
        _check(self.reasoning == "auto" or self.name in ("dataset", "coding"), f"{p}.reasoning", self.reasoning,
               "is for env.name=dataset (its math and exact verifiers) and coding")
        _check(not self.filter_long_prompts or self.name == "dataset", f"{p}.filter_long_prompts", True,
               "is for env.name=dataset")
        _check(not self.tools or self.name == "dataset", f"{p}.tools", list(self.tools),
               "is for env.name=dataset (env.name=tools is the toy calculator env)")
        for tool in self.tools:
            _check(tool in BUILTIN_TOOLS or (":" in str(tool) and all(str(tool).split(":", 1))),
                   f"{p}.tools", list(self.tools), "each is calculator, python or package.module:function")
        _check(self.tool_format in TOOL_FORMATS, f"{p}.tool_format", self.tool_format,
               f"must be {_either(TOOL_FORMATS)} (envs/tool_formats.py)")
        _check(self.tool_output_chars > 0, f"{p}.tool_output_chars", self.tool_output_chars, "must be > 0")
        _check(not self.extra_keys or (self.name == "dataset" and ":" in self.reward), f"{p}.extra_keys",
               list(self.extra_keys), "is for env.name=dataset with a custom verifier (env.reward=package.module:function)")
        for name, path in self.eval_sets.items():
            _check(self.name == "dataset", f"{p}.eval_sets", dict(self.eval_sets), "is for env.name=dataset")
            _check(re.fullmatch(r"[A-Za-z0-9_.]+", str(name)) is not None and name != "accuracy"
                   and not str(name).startswith("pass@"), f"{p}.eval_sets", name,
                   "set names are letters, digits, '_' and '.' (not 'accuracy' or 'pass@...'): they name metrics")
            _check(isinstance(path, str) and bool(path), f"{p}.eval_sets.{name}", path, "must be a file path")
        _check(is_reward_range(self.reward_range), f"{p}.reward_range", self.reward_range,
               "must be [low, high], finite, low < high")
        if self.tokenizer != "hf":
            for key in ("tokenizer_path", "system_prompt", "eos_token"):
                _check(getattr(self, key) is None, f"{p}.{key}", getattr(self, key),
                       f"is for env.tokenizer=hf (this is {self.tokenizer})")
            _check(not self.chat_template_kwargs, f"{p}.chat_template_kwargs", self.chat_template_kwargs,
                   f"is for env.tokenizer=hf (this is {self.tokenizer})")
        _check(self.eval_set in ("toy", "humaneval"), f"{p}.eval_set", self.eval_set, "must be toy or humaneval")
        _check(self.eval_set == "toy" or (self.name == "coding" and self.tokenizer not in ("char", "auto")), f"{p}.eval_set",
               self.eval_set, "humaneval is an eval set of env.name=coding with a real tokenizer (env.tokenizer=gpt2)")
        _check(self.eval_max_new_tokens >= 0, f"{p}.eval_max_new_tokens", self.eval_max_new_tokens, "must be >= 0")
        _check(self.len_median >= 1, f"{p}.len_median", self.len_median, "must be >= 1")
        _check(self.len_sigma >= 0, f"{p}.len_sigma", self.len_sigma, "must be >= 0")
        _check(self.len_max >= 1, f"{p}.len_max", self.len_max, "must be >= 1")
        _check(1 <= self.min_digits <= self.max_digits, f"{p}.min_digits", self.min_digits,
               f"must be in [1, env.max_digits={self.max_digits}]")
        _check(self.max_digits <= 9, f"{p}.max_digits", self.max_digits, "must be <= 9")
        _check(len(self.ops) > 0 and all(o in "+-*" for o in self.ops), f"{p}.ops", self.ops,
               "must be a non-empty list of '+', '-', '*'")
        _check(0 <= self.teacher_carry_error <= 1, f"{p}.teacher_carry_error", self.teacher_carry_error,
               "must be in [0, 1]")
        _check(0 <= self.teacher_skips_tool <= 1, f"{p}.teacher_skips_tool", self.teacher_skips_tool,
               "must be in [0, 1]")
        _check(self.teacher_skips_tool == 0 or self.name == "tools", f"{p}.teacher_skips_tool",
               self.teacher_skips_tool, f"is for env.name=tools (this is {self.name})")
        _check(self.num_eval > 0, f"{p}.num_eval", self.num_eval, "must be > 0")
        if self.name == "arithmetic":  # held-out prompts must leave the training stream its share
            numbers = sum(10 if d == 1 else 9 * 10 ** (d - 1) for d in range(self.min_digits, self.max_digits + 1))
            space = numbers * numbers * len(set(self.ops))
            _check(self.num_eval <= space // 2, f"{p}.num_eval", self.num_eval,
                   f"must be <= {space // 2}: env.min_digits={self.min_digits}..env.max_digits={self.max_digits} "
                   f"with ops {self.ops} has only {space} distinct problems, half of them kept for training")
        _check(self.reward_timeout_s > 0, f"{p}.reward_timeout_s", self.reward_timeout_s, "must be > 0")
        _check(self.reward_workers > 0, f"{p}.reward_workers", self.reward_workers, "must be > 0")
        _check(self.overlong_buffer >= 0, f"{p}.overlong_buffer", self.overlong_buffer, "must be >= 0 (0: off)")
        _check(0 <= self.overlong_penalty < float("inf"), f"{p}.overlong_penalty", self.overlong_penalty,
               "must be a finite number >= 0")


@dataclass
class SandboxConfig:
    """Where model-written code runs. ``auto``: bubblewrap if usable, else refuse (unless
    ``allow_unsandboxed``, which runs it as a plain subprocess and warns at every start)."""

    backend: str = "auto"  # auto | bwrap | none
    allow_unsandboxed: bool = False
    slots: int = 4
    base_uid: int = 20000  # slot i runs as uid base_uid + i
    python: str = "/usr/bin/python3"
    wall_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512
    file_mb: int = 16
    # per-execution disk budget: sized tmpfs for the working dir (1/2), /tmp and /dev/shm (1/4 each)
    disk_mb: int = 64
    nproc: int = 32
    max_output_bytes: int = 65536

    def validate(self, p: str = "sandbox") -> None:
        _check(self.backend in ("auto", "bwrap", "none"), f"{p}.backend", self.backend, "must be auto, bwrap or none")
        _check(self.slots >= 1, f"{p}.slots", self.slots, "must be >= 1")
        _check(self.base_uid >= 1000, f"{p}.base_uid", self.base_uid, "must be >= 1000 (an unprivileged uid)")
        for name in ("wall_s", "cpu_s", "memory_mb", "file_mb", "disk_mb", "nproc", "max_output_bytes"):
            _check(getattr(self, name) > 0, f"{p}.{name}", getattr(self, name), "must be > 0")


@dataclass
class PlacementConfig:
    """Where actors go (rlpost/placement.py). ``strategy``: Ray's placement-group strategy for the
    trainer's bundles and the workers' (PACK fills nodes in turn, SPREAD spreads them).
    ``colocate``: rank i and worker i share bundle i (and its GPU, half each)."""

    strategy: str = "PACK"
    colocate: bool = False

    def validate(self, p: str = "placement") -> None:
        _check(self.strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), f"{p}.strategy", self.strategy,
               "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")


@dataclass
class BufferConfig:
    """Redis buffer. ``url=null`` starts a private redis-server on a unix socket in the run dir."""

    url: Optional[str] = None
    username: Optional[str] = None
    # Prefer the RLPOST_REDIS_PASSWORD environment variable; printed and logged configs mask it.
    password: Optional[str] = None
    ssl_ca_certs: Optional[str] = None
    # Items a consumer read but did not ack for this long are reclaimed by another consumer.
    reclaim_idle_ms: int = 30000
    # The private server (url=null): unix = a socket in the run dir (one machine); tcp = the
    # driver's node address, a free port and a random password (workers and ranks on other nodes
    # reach it); auto = tcp when the run joins an existing Ray cluster (ray_address), else unix.
    listen: str = "auto"
    # The private server's append-only file, so a Redis that dies is restarted with the buffer
    # intact (the driver restarts it); its cost on APRIL was within run-to-run noise on 2 cores.
    # appendfsync: everysec (at most ~1 s of writes lost), always (nothing lost: exactly-once
    # survives a crash), no.
    appendonly: bool = True
    appendfsync: str = "everysec"
    # Backpressure: workers start no new task while `complete` holds this many groups (0: no
    # bound). It can overshoot by the groups already generating.
    max_complete: int = 0

    def validate(self, p: str = "buffer") -> None:
        _check(self.appendfsync in ("always", "everysec", "no"), f"{p}.appendfsync", self.appendfsync,
               "must be always, everysec or no")
        _check(self.max_complete >= 0, f"{p}.max_complete", self.max_complete, "must be >= 0 (0: no bound)")
        _check(self.listen in ("auto", "unix", "tcp"), f"{p}.listen", self.listen, "must be auto, unix or tcp")
        if self.url is not None:
            _check(self.url.startswith(("redis://", "rediss://", "unix://")), f"{p}.url", self.url,
                   "must start with redis://, rediss:// or unix://")
        _check(self.reclaim_idle_ms > 0, f"{p}.reclaim_idle_ms", self.reclaim_idle_ms, "must be > 0")


@dataclass
class LoggerConfig:
    backend: str = "jsonl"  # jsonl | wandb (jsonl is always written)
    project: str = "rlpost"
    entity: Optional[str] = None
    # offline unless the user sets wandb_mode=online and has a key.
    wandb_mode: str = "offline"
    progress: bool = True
    # rows of each evaluation's answers logged to wandb as a table (all of them are in
    # <run_dir>/evals/<tag>.jsonl)
    table_rows: int = 16
    # every N RL steps, that step's trained samples as text (prompt, response, reward, advantage,
    # verdict, policy versions) to <run_dir>/rollouts/step<N>.jsonl; 0: off (rlpost/rollout_dump.py)
    rollouts_every: int = 0

    def validate(self, p: str = "logger") -> None:
        _check(self.backend in ("jsonl", "wandb"), f"{p}.backend", self.backend, "must be jsonl or wandb")
        _check(self.wandb_mode in ("offline", "online", "disabled"), f"{p}.wandb_mode", self.wandb_mode,
               "must be offline, online or disabled")
        _check(self.table_rows >= 0, f"{p}.table_rows", self.table_rows, "must be >= 0")
        _check(self.rollouts_every >= 0, f"{p}.rollouts_every", self.rollouts_every, "must be >= 0 (0: off)")


@dataclass
class EvalConfig:
    """Held-out evaluation (rlpost/evaluation.py)."""

    every: int = 0  # evaluate every N steps (0: only before and after RL)
    timeout_s: float = 300.0
    # Answers per held-out prompt and how they are sampled: 1 at temperature 0 is greedy
    # accuracy; n > 1 (temperature > 0) also reports eval/pass@k for k = 1, 2, 4, ..., n.
    samples_per_prompt: int = 1
    temperature: float = 0.0
    top_p: float = 1.0

    def validate(self, p: str = "eval") -> None:
        _check(self.every >= 0, f"{p}.every", self.every, "must be >= 0")
        _check(self.timeout_s > 0, f"{p}.timeout_s", self.timeout_s, "must be > 0")
        _check(self.samples_per_prompt >= 1, f"{p}.samples_per_prompt", self.samples_per_prompt, "must be >= 1")
        _check(math.isfinite(self.temperature) and self.temperature >= 0, f"{p}.temperature", self.temperature,
               "must be >= 0 (0: greedy)")
        _check(self.samples_per_prompt == 1 or self.temperature > 0, f"{p}.samples_per_prompt",
               self.samples_per_prompt, f"needs {p}.temperature > 0 (greedy answers are all the same)")
        _check(0 < self.top_p <= 1, f"{p}.top_p", self.top_p, "must be in (0, 1]")


@dataclass
class RlpostConfig:
    name: str = "default"
    seed: int = 0
    mode: str = "sync"
    # null: <run_root>/<date>/<time>-<name>. An existing run dir resumes from its latest checkpoint.
    run_dir: Optional[str] = None
    # Where run dirs go (null: $RLPOST_RUN_ROOT, else ./outputs). A job submitted with
    # `ray job submit --working-dir` must set one: Ray deletes its copy of the working dir.
    run_root: Optional[str] = None
    ray_address: Optional[str] = None
    ray_num_cpus: int = 0  # 0: all cores
    time_limit_s: float = 0.0  # stop RL after this long (0: no limit)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "RlpostConfig":
        if self.env.tokenizer == "auto":  # resolved first, so every rule and config.yaml see the real one
            self.env.tokenizer = "hf" if self.env.takes_real_tokenizer and holds_tokenizer(self.model.path) else "char"
        if self.model.path:  # the checkpoint's architecture replaces the model fields before any rule reads
            # them (a 32k-context checkpoint takes rollout.max_new_tokens=1024 without model.max_seq_len)
            from rlpost.modeling import model_config_from_hf

            self.model = model_config_from_hf(os.path.abspath(self.model.path), self.model)
        _check(self.mode in MODES, "mode", self.mode, f"must be one of {', '.join(MODES)}")
        if self.mode == "sync":
            _check(self.rollout.over_sampling == 1, "rollout.over_sampling", self.rollout.over_sampling,
                   "over-sampling needs mode=april")
        _check(self.ray_num_cpus >= 0, "ray_num_cpus", self.ray_num_cpus, "must be >= 0")
        _check(self.time_limit_s >= 0, "time_limit_s", self.time_limit_s, "must be >= 0")
        for f in fields(self):
            sub = getattr(self, f.name)
            if is_dataclass(sub):
                sub.validate(f.name)
        _check(self.rollout.max_new_tokens < self.model.max_seq_len, "rollout.max_new_tokens",
               self.rollout.max_new_tokens, f"must be < model.max_seq_len={self.model.max_seq_len}")
        _check(self.env.overlong_buffer <= self.rollout.max_new_tokens, "env.overlong_buffer",
               self.env.overlong_buffer, f"must be <= rollout.max_new_tokens={self.rollout.max_new_tokens}")
        budget = self.trainer.max_tokens_per_micro_batch
        _check(budget == 0 or budget >= self.model.max_seq_len, "trainer.max_tokens_per_micro_batch", budget,
               f"must be >= model.max_seq_len={self.model.max_seq_len} (every sequence must fit a micro-batch)")
        _check(self.model.num_experts % self.trainer.ep_size == 0, "trainer.ep_size", self.trainer.ep_size,
               f"must divide model.num_experts={self.model.num_experts}")
        if self.placement.colocate:
            _check(self.engine.tensor_parallel_size == 1 or not self.engine.num_gpus, "placement.colocate", True,
                   f"shares one GPU between a trainer rank and a rollout worker; an engine over "
                   f"engine.tensor_parallel_size={self.engine.tensor_parallel_size} GPUs needs its own (colocate=false)")
            _check(self.rollout.num_workers == self.trainer.num_ranks, "placement.colocate", True,
                   f"needs rollout.num_workers == trainer.num_ranks (bundle i holds rank i and worker i), got "
                   f"{self.rollout.num_workers} and {self.trainer.num_ranks}")
        ranks, prompts = self.trainer.num_ranks, self.rollout.batch_prompts
        _check(prompts >= ranks and prompts % ranks == 0, "rollout.batch_prompts", prompts,
               f"must be a multiple of trainer.num_ranks={ranks} (each rank trains whole groups)")
        micro, minibatches = self.trainer.micro_batch_size, self.trainer.ppo_minibatches
        if micro and minibatches > 1:  # DeepSpeed's accumulation count is per optimiser step
            per_rank = prompts * self.rollout.group_size // ranks
            accum = -(-per_rank // micro)
            _check(per_rank // minibatches >= accum, "trainer.micro_batch_size", micro,
                   f"with trainer.ppo_minibatches={minibatches} a minibatch has {per_rank // minibatches} samples per "
                   f"rank, fewer than the {accum} micro-batches of an optimiser step (raise trainer.micro_batch_size "
                   f"or lower trainer.ppo_minibatches)")
        tp = self.engine.tensor_parallel_size
        for name in ("n_heads", "n_kv_heads"):  # vLLM replicates key/value heads when tp exceeds them
            heads = getattr(self.model, name)
            _check(heads % tp == 0 or (name == "n_kv_heads" and tp % heads == 0), "engine.tensor_parallel_size", tp,
                   f"must divide model.{name}={heads} (each tensor-parallel rank holds whole heads)")
        for name in ("d_ff", "dense_d_ff"):
            width = getattr(self.model, name)
            _check(width % tp == 0, "engine.tensor_parallel_size", tp,
                   f"must divide model.{name}={width} (each tensor-parallel rank holds a slice of every feed-forward layer)")
        if self.trainer.routing_replay and self.engine.name != "native":
            _check(self.engine.return_routed_experts, "trainer.routing_replay", True,
                   f"needs the engine's routing: set engine.return_routed_experts=true (engine={self.engine.name})")
        if self.env.tokenizer == "hf":  # resolved here (absolute, for every process), so config.yaml says it
            _check(bool(self.env.tokenizer_path or self.model.path), "env.tokenizer", "hf",
                   "needs env.tokenizer_path or model.path (a local Hugging Face checkpoint or tokenizer folder)")
            self.env.tokenizer_path = os.path.abspath(self.env.tokenizer_path or self.model.path)
        if self.env.name == "coding":  # a sample's program must fit in its reward budget
            _check(self.sandbox.wall_s <= self.env.reward_timeout_s, "sandbox.wall_s", self.sandbox.wall_s,
                   f"must be <= env.reward_timeout_s={self.env.reward_timeout_s} (the per-sample reward budget)")
        return self


def holds_tokenizer(path: Optional[str]) -> bool:
    """Whether a checkpoint folder ships its tokenizer (what ``env.tokenizer=auto`` looks for)."""
    return bool(path) and any(os.path.isfile(os.path.join(path, name))
                              for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def register_schema() -> None:
    """Register the dataclasses with hydra's ConfigStore (the YAML tree's schema)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="rlpost_schema", node=RlpostConfig)
