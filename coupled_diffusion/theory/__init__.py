"""Closed-form physics of k coupled Ornstein-Uhlenbeck processes."""
