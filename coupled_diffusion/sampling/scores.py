r"""Exact scores of the coupled forward process: population (eq 21-22), empirical (eq 18,
31) and conditional (eq 142-143).

A state is an array of shape `(..., k, d)`: $k$ modalities of dimension $d$, with any
leading batch shape. The forward process acts as $M(t) \otimes I_d$, so every
$k \times k$ quantity (E, Q, C, their inverses) is computed once per time and applied
along the modality axis; nothing of size $(kd)^2$ is ever formed.

All scores are frozen PyTrees (`eqx.Module`) called as `score(t, z)` with the forward
time `t`; they are `jit`/`vmap`/`grad`-able.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from .._linalg import Mat, kron_apply
from ..theory.mixture import TwoClassMixture
from ..theory.moments import MomentPath, marginal_moments
from ..theory.ou import CoupledOU


class PopulationScore(eqx.Module):
    r"""$\nabla_z \log P_t(z) = -C^{-1} z + C^{-1}\mu(t) \tanh(\mu(t)^\top C^{-1} z)$ (eq 21-22), any M.

    Build it with [`PopulationScore.of`][]; call it as `score(t, z)`.
    """

    path: MomentPath
    means: jax.Array
    variances: jax.Array

    @classmethod
    def of(cls, ou: CoupledOU, data: TwoClassMixture, means, *, t_max=None) -> "PopulationScore":
        """`t_max` bounds the times a time-dependent M will be asked at (its ODE horizon)."""
        _check_means(data, means)
        return cls(_moment_path(ou, t_max), means, data.variances)

    def _parts(self, t, z):
        _check_state(z, self.means.shape, "z")
        E, _, C = marginal_moments(self.path, t, self.variances)
        Ci = jnp.linalg.inv(C).astype(z.dtype)
        mu = (E @ self.means).astype(z.dtype)
        a = kron_apply(Ci, z)
        u = jnp.sum(mu * a, axis=(-2, -1))
        return C, Ci, mu, a, u

    def __call__(self, t, z):
        _, Ci, mu, a, u = self._parts(t, z)
        return -a + (Ci @ mu) * jnp.tanh(u)[..., None, None]

    def log_prob(self, t, z):
        r"""$\log P_t(z)$ (eq 20), normalised."""
        C, Ci, mu, a, u = self._parts(t, z)
        k, d = z.shape[-2:]
        logdet = d * jnp.linalg.slogdet(2 * jnp.pi * C)[1]
        quad = jnp.sum(z * a, axis=(-2, -1)) + jnp.sum(mu * (Ci @ mu))
        return -0.5 * (quad + logdet) + _logcosh(u)


def _logcosh(u):
    return jnp.abs(u) + jnp.log1p(jnp.exp(-2 * jnp.abs(u))) - jnp.log(2.0)


def _check_state(z, shape, name):
    if z.shape[-len(shape):] != tuple(shape):
        raise ValueError(f"`{name}` must have shape (..., {', '.join(map(str, shape))}) (batch, then k modalities of dimension d), "
                         f"got {z.shape}.")


def _moment_path(ou: CoupledOU, t_max) -> MomentPath:
    """The process's moment path for a score; a time-dependent M needs `t_max`, its moment ODE's horizon."""
    if ou.time_dependent and t_max is None:
        raise ValueError("A time-dependent M needs `t_max` (the horizon of its moment ODE).")
    return MomentPath.of(ou, t_max if t_max is not None else 0.0)


def _check_means(data, means):
    if means.ndim != 2 or means.shape[0] != data.k:
        raise ValueError(f"`means` must have shape (k, d) = ({data.k}, d), got {means.shape}.")


class EmpiricalScore(eqx.Module):
    r"""The exact score of the empirical mixture $p_t^{(n)}$ (eq 18) of `n` training points.

    $\nabla \log p_t^{(n)}(z) = Q^{-1}\big(\sum_i w_i(z)\, E z_i - z\big)$ with the
    posterior weights $w_i \propto K_t(z|z_i)$ (eq 31). The sum runs over the training
    set in chunks of `chunk` points with an online log-sum-exp (a running maximum, sum
    and weighted mean), so memory is `batch x chunk`, not `batch x n`: $n = 10^5$
    points at $d = 784$ need the points themselves (0.3 GB in float32) and little more.

    Undefined at $t = 0$ ($Q(0) = 0$): samplers evaluate it at $t > 0$ only.
    """

    path: MomentPath
    points: jax.Array
    chunks: jax.Array
    chunk: int = eqx.field(static=True)

    def __init__(self, path, points, chunk):
        n = points.shape[0]
        n_chunks = -(-n // chunk)
        pad = jnp.zeros((n_chunks * chunk - n,) + points.shape[1:], points.dtype)
        self.path, self.points, self.chunk = path, points, chunk
        # padded and split once here, not at every score evaluation
        self.chunks = jnp.concatenate([points, pad]).reshape((n_chunks, chunk) + points.shape[1:])

    @classmethod
    def of(cls, ou: CoupledOU, points, *, chunk: int = 2048, t_max=None) -> "EmpiricalScore":
        points = jnp.asarray(points)
        if points.ndim != 3 or points.shape[1] != ou.k:
            raise ValueError(f"`points` must have shape (n, k, d) with k = {ou.k}, got {points.shape}.")
        if not (isinstance(chunk, int) and chunk >= 1):
            raise ValueError(f"`chunk` must be a positive integer, got {chunk!r}.")
        return cls(_moment_path(ou, t_max), points, min(chunk, points.shape[0]))

    def _scan(self, t, z, select=None):
        """Online log-sum-exp over the training set: `(score, log Z, max logit, argmax)`. With `select`
        (a slice or indices along d) only those coordinates of the score are accumulated and returned (the
        weights still use all of z): what a patch score needs of each patch's centre."""
        _check_state(z, self.points.shape[1:], "z")
        pick = (lambda x: x) if select is None else (lambda x: x[..., select])  # noqa: E731 - the accumulated coordinates
        E, Q = self.path(t)
        Qi = jnp.linalg.inv(0.5 * (Q + Q.T)).astype(z.dtype)
        E = E.astype(z.dtype)
        a = kron_apply(Qi, z)  # (..., k, d)
        batch = z.shape[:-2]
        flat_a = a.reshape((-1,) + z.shape[-2:])
        n, c = self.points.shape[0], self.chunk
        n_chunks = self.chunks.shape[0]
        pts = self.chunks.astype(z.dtype)
        valid = (jnp.arange(n_chunks * c) < n).reshape(n_chunks, c)
        B = flat_a.shape[0]

        def body(carry, xs):
            m_run, s_run, w_run, best, arg = carry
            P, ok, offset = xs
            m = kron_apply(E, P)  # E z_i, (c, k, d)
            logits = jnp.einsum("bkd,ckd->bc", flat_a, m) - 0.5 * jnp.sum(m * kron_apply(Qi, m), axis=(-2, -1))
            logits = jnp.where(ok, logits, -jnp.inf)
            c_max = jnp.max(logits, axis=1)
            new_m = jnp.maximum(m_run, c_max)
            p = jnp.exp(logits - new_m[:, None])
            scale = jnp.exp(m_run - new_m)
            s_new = s_run * scale + jnp.sum(p, axis=1)
            w_new = w_run * scale[:, None, None] + jnp.einsum("bc,ckd->bkd", p, pick(m))
            c_arg = jnp.argmax(logits, axis=1).astype(jnp.int32) + offset
            better = c_max > best
            return (new_m, s_new, w_new, jnp.where(better, c_max, best), jnp.where(better, c_arg, arg)), None

        init = (
            jnp.full((B,), -jnp.inf, z.dtype),
            jnp.zeros((B,), z.dtype),
            jnp.zeros_like(pick(flat_a)),
            jnp.full((B,), -jnp.inf, z.dtype),
            jnp.zeros((B,), jnp.int32),
        )
        offsets = jnp.arange(n_chunks, dtype=jnp.int32) * c
        (m_run, s_run, w_run, best, arg), _ = jax.lax.scan(body, init, (pts, valid, offsets))
        mean = w_run / s_run[:, None, None]
        score = kron_apply(Qi, mean) - pick(flat_a)
        score = score.reshape(batch + score.shape[-2:])
        log_z = (m_run + jnp.log(s_run)).reshape(batch)
        return score, log_z, best.reshape(batch), arg.reshape(batch)

    def __call__(self, t, z):
        return self._scan(t, z)[0]

    def max_weight(self, t, z):
        r"""$\max_i w_i(z)$ and its index: memorisation shows as a weight near 1 (eq 31)."""
        _, log_z, best, arg = self._scan(t, z)
        return jnp.exp(best - log_z), arg

    def weights(self, t, z):
        r"""All posterior weights $w_i(z)$ (eq 31), shape `batch + (n,)` (materialised: small n only)."""
        E, Q = self.path(t)
        Qi = jnp.linalg.inv(0.5 * (Q + Q.T)).astype(z.dtype)
        m = kron_apply(E.astype(z.dtype), self.points.astype(z.dtype))
        r = z[..., None, :, :] - m
        return jax.nn.softmax(-0.5 * jnp.sum(r * kron_apply(Qi, r), axis=(-2, -1)), axis=-1)


class ConditionalScore(eqx.Module):
    r"""Score of one modality given the others under the population mixture (eq 142-143).

    With $C(t)$ partitioned into the `target` modality $y$ and the rest $x$:
    $P_t(y|x) = \sum_{s=\pm} w_s(x)\, N(y; m_s(x), C_{y|x} I_d)$ (eq 142) where
    $m_s = s\mu_y + C_{yx}C_{xx}^{-1}(x - s\mu_x)$, $C_{y|x} = C_{yy} - C_{yx}C_{xx}^{-1}C_{xy}$
    (the Schur complement, eq 88) and $w_+ = \sigma(2\mu_x^\top C_{xx}^{-1} x)$. Any M,
    constant or time-dependent (Appendix C uses the anisotropic M with $g(t)$).

    Calls take `y` of shape `(..., d)` and `x` of shape `(..., k-1, d)` (the other
    modalities in their order).
    """

    path: MomentPath
    means: jax.Array
    variances: jax.Array
    target: int = eqx.field(static=True)

    @classmethod
    def of(cls, ou: CoupledOU, data: TwoClassMixture, means, *, target: int = -1, t_max=None) -> "ConditionalScore":
        _check_means(data, means)
        if data.k < 2:
            raise ValueError("A conditional score needs k >= 2 modalities.")
        return cls(_moment_path(ou, t_max), means, data.variances, target % data.k)

    def _parts(self, t, x):
        """Per-time quantities: $C_{y|x}$, $K = C_{yx}C_{xx}^{-1}$, $\\delta = \\mu_y - K\\mu_x$, and $h = \\mu_x^\\top C_{xx}^{-1} x$."""
        k = self.means.shape[0]
        rest = [i for i in range(k) if i != self.target]
        E, _, C = marginal_moments(self.path, t, self.variances)
        mu = (E @ self.means).astype(x.dtype)
        Cm = Mat.of(C)
        C_xx = Mat([[Cm[i, j] for j in rest] for i in rest])
        C_xx_inv = C_xx.inv()  # cofactors for k - 1 <= 4: no LAPACK call per step
        C_yx = [Cm[self.target, j] for j in rest]
        Kg = jnp.stack([sum(C_yx[a] * C_xx_inv[a, b] for a in range(len(rest))) for b in range(len(rest))])
        var = (Cm[self.target, self.target] - Kg @ jnp.stack(C_yx)).astype(x.dtype)
        Kg = Kg.astype(x.dtype)
        mu_x = mu[jnp.array(rest)]
        delta = mu[self.target] - Kg @ mu_x  # m_s = s delta + K x
        # reductions over d written as matrix-vector products (vectorise well on CPU)
        xs = [x[..., j, :] for j in range(len(rest))]
        w = C_xx_inv.array().astype(x.dtype) @ mu_x  # C_xx^{-1} mu_x, (k-1, d)
        h = sum(xs[j] @ w[j] for j in range(len(rest)))
        kx = sum(Kg[j] * xs[j] for j in range(len(rest)))
        return var, delta, kx, h

    def class_weights(self, t, x):
        r"""$(w_+, w_-)$: the posterior class probabilities given $x$, shape `(..., 2)`."""
        h = self._parts(t, x)[3]
        return jnp.stack([jax.nn.sigmoid(2 * h), jax.nn.sigmoid(-2 * h)], -1)

    def __call__(self, t, y, x):
        # the two components share C_{y|x}, so the score is linear plus one tanh:
        # (K x - y + tanh(h + delta.(y - K x) / C_{y|x}) delta) / C_{y|x}
        var, delta, kx, h = self._parts(t, x)
        r = y - kx
        rho = h + (r @ delta) / var
        return (jnp.tanh(rho)[..., None] * delta - r) / var

    def log_prob(self, t, y, x):
        r"""$\log P_t(y|x)$ (eq 142), normalised over $y \in \mathbb{R}^d$; at $t = 0$ it is the NLL of eq (146)."""
        var, delta, kx, h = self._parts(t, x)
        d = y.shape[-1]
        r = y - kx
        logw = jnp.stack([jax.nn.log_sigmoid(2 * h), jax.nn.log_sigmoid(-2 * h)], -1)
        sq = jnp.stack([jnp.sum((r - delta) ** 2, -1), jnp.sum((r + delta) ** 2, -1)], -1)
        return jax.nn.logsumexp(logw - 0.5 * sq / var[..., None], axis=-1) - 0.5 * d * jnp.log(2 * jnp.pi * var)

    def sample(self, key, t, x):
        r"""One exact draw of $y \sim P_t(y|x)$ per `x`."""
        var, delta, kx, h = self._parts(t, x)
        k_s, k_n = jax.random.split(key)
        sign = jnp.where(jax.random.bernoulli(k_s, jax.nn.sigmoid(2 * h)), 1.0, -1.0).astype(x.dtype)
        mean = kx + sign[..., None] * delta
        return mean + jnp.sqrt(var) * jax.random.normal(k_n, mean.shape, mean.dtype)
