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


class VPScore(eqx.Module):
    r"""A discrete-VP noise predictor seen as a score of the equivalent OU process, for the criticality tools.

    The VP forward law $z_n = \sqrt{\bar\alpha_n}\,x_0 + \sqrt{1 - \bar\alpha_n}\,\varepsilon$ (noise covariance
    $\Sigma$ per pixel) is the OU process $dZ = -Z\,ds + \sqrt2\,\Sigma^{1/2} dW$ at the time $s$ with
    $\bar\alpha_n = e^{-2s}$, so its reverse drift is $f_s(z) = z + 2\Sigma\nabla\log p_s(z) =
    z - 2\hat\varepsilon / \sqrt{1 - \bar\alpha_n}$. `score(s, z)` returns $\Sigma\nabla\log p_s(z) =
    -\hat\varepsilon(z, n(s)) / \sqrt{1 - \bar\alpha_{n(s)}}$ on states `(..., k, d)` (d = H W, row-major), so
    that [`reverse_drift`][] with `ou = vp.ou` ($M = -I$, $\sigma_W^2 = 2$) is that drift; with isotropic noise
    ($\Sigma = I$) it is the score itself. $n(s)$ is the timestep whose $\log\bar\alpha$ is nearest to $-2s$
    (`discrete=True`, the default: networks trained on integer timesteps), or the fractional one
    (`discrete=False`). [`VPScore.ou_time`][] gives the OU time of a timestep.

    `eps_fn(z, t)` takes images `(B, H, W, k)` and timesteps `(B,)`, as `NNXEps` and `EmpiricalEps` do.
    """

    eps_fn: object
    schedule: VPSchedule
    height: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    k: int = eqx.field(static=True)
    discrete: bool = eqx.field(static=True, default=True)

    @classmethod
    def of(cls, eps_fn, schedule: VPSchedule, *, shape: tuple[int, int, int], discrete: bool = True) -> VPScore:
        """`shape`: the model's image shape `(H, W, k)`."""
        if len(shape) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in shape):
            raise ValueError(f"`shape` must be the images' (H, W, k), positive integers, got {shape!r}.")
        H, W, k = (int(v) for v in shape)
        return cls(eps_fn, schedule, H, W, k, bool(discrete))

    @property
    def ou(self):
        """The equivalent OU process, $M = -I_k$, $\sigma_W^2 = 2$ (its drift is the VP reverse drift)."""
        from ..theory.ou import CoupledOU

        return CoupledOU(-jnp.eye(self.k, dtype=jnp.float32), 2.0)

    def ou_time(self, n):
        r"""$s_n = -\frac12 \log\bar\alpha_n$, the OU time of timestep(s) `n`."""
        return -0.5 * jnp.log(self.schedule.alphas_cumprod[jnp.asarray(n)])

    def timestep(self, s):
        """The timestep of OU time(s) `s`: the nearest integer (`discrete=True`), or fractional, log-linear in
        $\bar\alpha$."""
        log_ab = jnp.log(self.schedule.alphas_cumprod)  # decreasing in n
        T = log_ab.shape[0]
        n = jnp.interp(-2.0 * jnp.asarray(s, log_ab.dtype), log_ab[::-1], jnp.arange(T, dtype=log_ab.dtype)[::-1])
        return jnp.clip(jnp.rint(n), 0, T - 1).astype(jnp.int32) if self.discrete else n

    def __call__(self, s, z):
        k, d = z.shape[-2:]
        if k != self.k or d != self.height * self.width:
            raise ValueError(f"`z` must be states (..., k, d) = (..., {self.k}, {self.height * self.width}), got {z.shape}.")
        batch = z.shape[:-2]
        img = jnp.moveaxis(z.reshape((-1, k, self.height, self.width)), 1, -1)
        n = self.timestep(s)
        ab = self.schedule.alphas_cumprod[n] if self.discrete else jnp.exp(-2.0 * jnp.asarray(s, jnp.float32))
        eps = self.eps_fn(img, jnp.broadcast_to(n, img.shape[:1]))
        out = -jnp.moveaxis(eps, -1, 1).reshape(batch + (k, d)) / jnp.sqrt(1.0 - ab)
        return out.astype(z.dtype)
