"""Flax NNX score networks."""
