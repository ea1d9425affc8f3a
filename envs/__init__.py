"""Reward sources. Each environment turns a task's response into a reward with a reason."""
