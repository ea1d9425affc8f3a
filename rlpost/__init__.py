"""rlpost: asynchronous RL post-training for LLMs (partial rollouts over Redis, DeepSpeed MoE)."""

__version__ = "0.1.0"
