"""Discrete VP diffusion on learned scores: schedules, mode-shaped noise, samplers, training."""
