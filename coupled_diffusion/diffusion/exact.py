r"""The exact noise prediction of a finite data set: the optimal (memorising) denoiser.

For data uniform on points $x_1, \dots, x_N$ and the forward law $z_t = \sqrt{\bar\alpha_t} x_0 +
\sqrt{1 - \bar\alpha_t}\,\varepsilon$ with mode-shaped noise $\varepsilon$ (channel covariance
$\Sigma$, eq 92-93, independent over pixels), the posterior over the points is a softmax of the
Mahalanobis distances $-\|z - \sqrt{\bar\alpha_t} x_i\|^2_{\Sigma^{-1}} / (2(1 - \bar\alpha_t))$, and
$\hat\varepsilon(z, t) = (z - \sqrt{\bar\alpha_t}\,E[x_0 \mid z_t]) / \sqrt{1 - \bar\alpha_t}$ minimises the
training loss (eq 96) exactly. A sampler driven by it returns one of the points: a model with a
known answer, for testing the protocols and for comparing a trained network with the score it
approximates (the empirical-score counterpart of `sampling.EmpiricalScore`).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .noise import ModeNoise, VPSchedule, per_sample


class EmpiricalEps(eqx.Module):
    """`eps(z, t)` of the uniform law on `points` `(N, H, W, k)`, for a `VPSchedule` and `ModeNoise`; see the module docstring."""

    points: Float[Array, "N H W k"]
    schedule: VPSchedule
    noise: ModeNoise

    def __init__(self, points, schedule: VPSchedule, noise: ModeNoise):
        p = np.asarray(points, np.float32)
        if p.ndim < 2 or p.shape[0] < 1 or p.shape[-1] != noise.k:
            raise ValueError(f"`points` must be (N, ..., k) with N >= 1 and k = {noise.k} channels, got shape {p.shape}.")
        if not np.all(np.isfinite(p)):
            raise ValueError("`points` hold non-finite values.")
        self.points, self.schedule, self.noise = jnp.asarray(p), schedule, noise

    def __call__(self, z, t):
        if z.shape[1:] != self.points.shape[1:]:
            raise ValueError(f"`z` must be (B,) + {self.points.shape[1:]}, got {z.shape}.")
        ab = per_sample(self.schedule.alphas_cumprod[jnp.broadcast_to(t, z.shape[:1])], z)
        y, yp = self.noise.whiten(z), self.noise.whiten(self.points.astype(z.dtype))  # Mahalanobis = Euclidean here
        flat_y, flat_p = y.reshape(y.shape[0], -1), yp.reshape(yp.shape[0], -1)
        s = jnp.sqrt(ab.reshape(-1, 1))
        d2 = (jnp.sum(flat_y**2, 1, keepdims=True) - 2 * s * flat_y @ flat_p.T + s**2 * jnp.sum(flat_p**2, 1)[None])
        w = jax.nn.softmax(-d2 / (2 * (1 - ab.reshape(-1, 1))), axis=-1)
        x0 = jnp.tensordot(w, self.points.astype(z.dtype), axes=1)
        return (z - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
