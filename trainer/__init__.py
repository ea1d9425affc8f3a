"""Trainer: models, DeepSpeed engine set-up, RL losses, checkpoints and weight publishing."""
