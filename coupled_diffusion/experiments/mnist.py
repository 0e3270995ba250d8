"""MNIST two-channel experiments (Section 5): sample grids now; Protocols I and II build on these pieces."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from ..diffusion.noise import ModeNoise, VPSchedule
from ..diffusion.samplers import NNXEps, sample


def draw_samples(result, n: int = 16, *, num_steps: int = 50, method: str = "ddim", seed: int = 0, ema: bool = True):
    """`n` samples `(n, 28, 28, 2)` in [-1, 1] units from a trained run (`TrainResult` or `load_run`)."""
    c = result.config
    schedule, noise = VPSchedule.named(c.schedule, c.T), ModeNoise.paired(c.g)
    key_start, key_run = jax.random.split(jax.random.key(seed))
    z_T = noise.sample(key_start, (n, 28, 28, 2))
    model = result.ema_model if ema else result.model
    return sample(NNXEps(model), schedule, noise, key_run, z_T, method=method, num_steps=min(num_steps, c.T)).z0


def sample_grid(result, path, *, n: int = 16, num_steps: int = 50, seed: int = 0) -> Path:
    """Save a PNG of `n` DDIM samples: rows x_A, x_B, u = (x_A + x_B)/2 and v = (x_A - x_B)/sqrt 2 (eq 103)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.asarray(draw_samples(result, n, num_steps=num_steps, seed=seed), np.float64)
    x = (z + 1) / 2  # back to [0, 1]
    rows = {"x_A": x[..., 0], "x_B": x[..., 1], "u": (x[..., 0] + x[..., 1]) / 2, "v": (x[..., 0] - x[..., 1]) / np.sqrt(2)}
    fig, axes = plt.subplots(4, n, figsize=(n * 0.8, 4 * 0.85), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(imgs[i], cmap="gray" if name != "v" else "RdBu_r", vmin=0 if name != "v" else -0.8,
                      vmax=1 if name != "v" else 0.8)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel(name)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


__all__ = ["draw_samples", "sample_grid"]
