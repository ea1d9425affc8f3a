"""GLM-4.5 MoE at toy size, shared by the model and engine tests."""

import torch

# GLM-4.5's features at toy size: a dense first layer, a shared expert, top-4 of 8 experts in 2
# groups of which a token uses 1, scaled weights, q/k/v biases, q/k norms, half-width rotary
GLM = dict(n_layers=3, first_dense_layers=1, dense_d_ff=96, d_ff=32, num_experts=8, top_k=4, shared_experts=1,
           n_group=2, topk_group=1, routed_scaling=2.5, attention_bias=True, qk_norm=True, partial_rotary=0.5)


def randomise_glm_extras(model: torch.nn.Module, seed: int = 0) -> None:
    """The parts a fresh model starts at zero (q/k/v biases, router correction biases) made
    random, so a test sees whether they are loaded, saved and used."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith((".bias", "e_score_correction_bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)
