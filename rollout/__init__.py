"""Rollout: inference engines behind one interface, the rollout worker actor, scheduling."""
