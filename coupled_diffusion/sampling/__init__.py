"""Exact-score simulation: scores, SDE/ODE samplers, cloning and memorisation."""
