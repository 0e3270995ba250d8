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
        r"""$s_n = -\frac12 \log\bar\alpha_n$, the OU time of timestep(s) `n` ([`VPSchedule.ou_time`][])."""
        return self.schedule.ou_time(n)

    def timestep(self, s):
        """The timestep of OU time(s) `s`: the nearest integer (`discrete=True`), or fractional, log-linear in
        $\bar\alpha$ ([`VPSchedule.timestep`][])."""
        return self.schedule.timestep(s, discrete=self.discrete)

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


class GaussianMixtureEps(eqx.Module):
    r"""The exact class-conditional noise predictor of a Gaussian mixture: class $c$ is $N(\mu_c, \Sigma_c)$ with
    weight $\pi_c$, and the forward law is $z = \sqrt{\bar\alpha}\,x_0 + \sqrt{1 - \bar\alpha}\,\varepsilon$ with
    isotropic noise. Class $c$ alone gives $z \sim N(\sqrt{\bar\alpha}\mu_c, C_c)$, $C_c = \bar\alpha\Sigma_c +
    (1 - \bar\alpha) I$, so $\hat\varepsilon_c(z) = \sqrt{1 - \bar\alpha}\,C_c^{-1}(z - \sqrt{\bar\alpha}\mu_c)$; the
    unconditional (null class `num_classes`) prediction is the posterior-weighted $\sum_c r_c(z)\hat\varepsilon_c(z)$,
    $r_c \propto \pi_c N(z; \sqrt{\bar\alpha}\mu_c, C_c)$. Both are exact, so classifier-free guidance on this model
    has a known answer at $w = 1$ (the class's own Gaussian) and the critical time of its unconditional drift is
    computable exactly ([`GaussianMixtureEps.critical_time`][]).

    `model(z, t, y)`: images `z` `(B, H, W, k)`, timesteps `t` `(B,)` of `schedule`, labels `y` `(B,)` in
    0 ... `num_classes` (the last one is the unconditional prediction), as a class-conditional [`DiT`][] is
    called; `y=None` is unconditional. Covariances are stored by their eigendecompositions.
    """

    means: Float[Array, "C D"]
    eigvecs: Float[Array, "C D D"]
    eigvals: Float[Array, "C D"]
    log_weights: Float[Array, " C"]
    schedule: VPSchedule
    shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, means, covariances, weights, schedule: VPSchedule, *, shape):
        mu = np.asarray(means, np.float64)
        cov = np.asarray(covariances, np.float64)
        w = np.asarray(weights, np.float64)
        shape = tuple(int(v) for v in shape)
        D = int(np.prod(shape))
        if mu.ndim != 2 or mu.shape[0] < 1 or mu.shape[1] != D:
            raise ValueError(f"`means` must be (C, D) with C >= 1 and D = prod(shape) = {D}, got shape {mu.shape}.")
        C = mu.shape[0]
        if cov.shape != (C, D, D):
            raise ValueError(f"`covariances` must be (C, D, D) = ({C}, {D}, {D}), got shape {cov.shape}.")
        if w.shape != (C,) or not np.all(w > 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"`weights` must be {C} positive finite numbers, got {w!r}.")
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(cov))):
            raise ValueError("`means` and `covariances` must be finite.")
        if not np.allclose(cov, np.swapaxes(cov, 1, 2), atol=1e-8 * max(1.0, float(np.abs(cov).max()))):
            raise ValueError("`covariances` must be symmetric.")
        lam, U = np.linalg.eigh(cov)
        if lam.min() < -1e-6 * max(1.0, float(lam.max())):
            raise ValueError(f"`covariances` must be positive semi-definite; the smallest eigenvalue is {lam.min():.3g}.")
        f = jnp.result_type(float)  # float64 under jax_enable_x64, else float32
        self.means, self.eigvecs = jnp.asarray(mu, f), jnp.asarray(U, f)
        self.eigvals = jnp.asarray(np.maximum(lam, 0.0), f)
        self.log_weights = jnp.asarray(np.log(w / w.sum()), f)
        self.schedule, self.shape = schedule, shape

    @classmethod
    def fit(cls, images, labels, schedule: VPSchedule, *, num_classes: int | None = None, ridge: float = 1e-3) -> GaussianMixtureEps:
        """Class means, covariances (plus `ridge` on the diagonal) and frequencies of `images` `(N, H, W, k)` with
        integer `labels` `(N,)` in 0 ... `num_classes` - 1 (default: the largest label + 1); every class needs at
        least two images."""
        x = np.asarray(images, np.float64)
        y = np.asarray(labels)
        if x.ndim != 4 or x.shape[0] < 2:
            raise ValueError(f"`images` must be (N, H, W, k) with N >= 2, got shape {x.shape}.")
        if y.shape != x.shape[:1] or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ValueError(f"`labels` must be {x.shape[0]} non-negative integers, got shape {y.shape}, dtype {y.dtype}.")
        C = int(y.max()) + 1 if num_classes is None else int(num_classes)
        counts = np.bincount(y, minlength=C)
        if y.max() >= C or counts.min() < 2:
            raise ValueError(f"every class 0 ... {C - 1} needs at least two images (counts {counts.tolist()}).")
        if not (np.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"`ridge` must be a finite number >= 0, got {ridge!r}.")
        flat = x.reshape(x.shape[0], -1)
        means = np.stack([flat[y == c].mean(0) for c in range(C)])
        covs = np.stack([np.cov(flat[y == c], rowvar=False) + ridge * np.eye(flat.shape[1]) for c in range(C)])
        return cls(means, covs, counts / counts.sum(), schedule, shape=x.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def mean(self):
        """The mixture's mean image, flattened `(D,)`."""
        return jnp.exp(self.log_weights) @ self.means

    def components(self, z, ab):
        r"""Per class, for flattened states `z` `(B, D)` at $\bar\alpha$ `ab` (scalar or `(B,)`): the log of
        $\pi_c N(z; \sqrt{\bar\alpha}\mu_c, C_c)$ up to a constant common to all classes, `(B, C)`, and
        $\hat\varepsilon_c$, `(B, C, D)`."""
        ab = jnp.broadcast_to(jnp.asarray(ab, z.dtype), z.shape[:1])[:, None, None]
        r = z[:, None, :] - jnp.sqrt(ab) * self.means.astype(z.dtype)[None]
        a = jnp.einsum("bcd,cde->bce", r, self.eigvecs.astype(z.dtype))  # coordinates in each class's eigenbasis
        v = ab * self.eigvals.astype(z.dtype)[None] + (1 - ab)
        logp = self.log_weights.astype(z.dtype) - 0.5 * jnp.sum(a**2 / v + jnp.log(v), -1)
        eps = jnp.sqrt(1 - ab) * jnp.einsum("cde,bce->bcd", self.eigvecs.astype(z.dtype), a / v)
        return logp, eps

    def eps(self, z, ab, y=None):
        """The prediction for flattened states `z` `(B, D)` at $\bar\alpha$ `ab`; `y` as in `__call__`."""
        logp, eps = self.components(z, ab)
        uncond = jnp.einsum("bc,bcd->bd", jax.nn.softmax(logp, -1), eps)
        if y is None:
            return uncond
        y = jnp.asarray(y, jnp.int32)
        cond = jnp.take_along_axis(eps, jnp.clip(y, 0, self.num_classes - 1)[:, None, None], 1)[:, 0]
        return jnp.where((y >= self.num_classes)[:, None], uncond, cond)

    def __call__(self, z, t, y=None):
        if z.shape[1:] != self.shape:
            raise ValueError(f"`z` must be (B,) + {self.shape}, got {z.shape}.")
        ab = self.schedule.alphas_cumprod[jnp.broadcast_to(t, z.shape[:1])].astype(z.dtype)
        return self.eps(z.reshape(z.shape[0], -1), ab, y).reshape(z.shape)

    def drift_jacobian(self, s, z=None):
        r"""The Jacobian $I + 2\nabla s_s(z)$ `(D, D)` of the unconditional reverse drift of the equivalent OU process
        ($\bar\alpha = e^{-2s}$, $s$ the OU time; see [`VPScore`][]) at the flattened state `z` (default: the mean
        state $e^{-s}\bar x$). Symmetric: the score is a gradient."""
        s = jnp.asarray(s, self.means.dtype)
        ab = jnp.exp(-2.0 * s)
        z = jnp.exp(-s) * self.mean if z is None else jnp.asarray(z, self.means.dtype)
        score = lambda x: -self.eps(x[None], ab)[0] / jnp.sqrt(1 - ab)  # noqa: E731
        J = jnp.eye(z.shape[-1], dtype=z.dtype) + 2.0 * jax.jacfwd(score)(z)
        return 0.5 * (J + J.T)

    def top_rate(self, s):
        """The largest eigenvalue of [`GaussianMixtureEps.drift_jacobian`][] at the mean state: the growth rate of
        the most unstable direction of the reverse drift at OU time `s`."""
        return jnp.linalg.eigvalsh(self.drift_jacobian(s))[-1]

    def critical_time(self, *, t_min: float = 0.01, t_max: float = 3.0, grid_size: int = 24, throw: bool = True):
        """The OU time at which the top rate about the mean state crosses zero, by [`critical_time`][] (its result
        codes and implicit gradient)."""
        from ..sampling.criticality import critical_time

        return critical_time(lambda s, m: m.top_rate(s), self, t_min=t_min, t_max=t_max, grid_size=grid_size, throw=throw)
