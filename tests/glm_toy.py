"""GLM-4.5 MoE at toy size, shared by the model and engine tests."""

import torch

# GLM-4.5's features at toy size: a dense first layer, a shared expert, top-4 of 8 experts in 2
# groups of which a token uses 1, scaled weights, q/k/v biases, q/k norms, half-width rotary
GLM = dict(n_layers=3, first_dense_layers=1, dense_d_ff=96, d_ff=32, num_experts=8, top_k=4, shared_experts=1,
           n_group=2, topk_group=1, routed_scaling=2.5, attention_bias=True, qk_norm=True, partial_rotary=0.5)


def randomise_glm_extras(model: torch.nn.Module, seed: int = 0) -> None:
    """The parts a fresh model starts at zero (biases, router correction biases, GPT-OSS's sinks)
    or one (q/k norms) made random, so a test sees whether they are loaded, saved and used."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith((".bias", "e_score_correction_bias", ".sinks")):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # a transposed or misplaced norm shows
                tensor.copy_(1 + torch.randn(tensor.shape, generator=gen) * 0.2)


# DeepSeek-V3's features at toy size: GLM's router and experts, multi-head latent attention with
# a query bottleneck (q_lora_rank), key/value latent, no-rope and rope query/key parts and a value
# width all different, so a swapped split or a wrong width shows
DEEPSEEK = dict(n_layers=3, n_heads=4, n_kv_heads=4, first_dense_layers=1, dense_d_ff=96, d_ff=32, num_experts=8,
                top_k=4, shared_experts=1, n_group=2, topk_group=1, routed_scaling=2.5, q_lora_rank=48,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24)
# YaRN as DeepSeek-V3 extends its context (factor 40 over 4k there), at toy size: mscale and
# mscale_all_dim differ, so both the cos/sin factor and the softmax temperature matter
YARN = dict(rope_type="yarn", rope_factor=4.0, rope_original_max_len=16, rope_mscale=0.8, rope_mscale_all_dim=1.0)

# GPT-OSS's features at toy size: grouped-query attention with sinks and biases on q/k/v/o, a
# 5-token sliding window on layers 0 and 2 (shorter than the tests' sequences), top-4 of 8
# experts with biases and the clamped SwiGLU, a router bias, and GPT-OSS's rotary: YaRN without
# truncation, factor 32 over 4k (at this head width the untruncated ramp ends change 4 of its 8
# frequencies)
OSS = dict(n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=32, num_experts=8, top_k=4, sliding_window=5,
           rope_type="yarn", rope_factor=32.0, rope_original_max_len=4096, rope_truncate=False, rope_theta=150000.0,
           rms_norm_eps=1e-5)

# MiniMax-M2's features at toy size: sigmoid routing with a correction bias (no groups, no
# scaling), top-4 of 8 experts, q/k norms over each whole projection, rotary on half of each
# head's dimensions (MiniMax-M2: 64 of 128)
MINIMAX = dict(n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=32, num_experts=8, top_k=4, partial_rotary=0.5)
