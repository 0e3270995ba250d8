r"""Exact draws of the laws the samplers start from and are judged against: the realised class
means, $P_0$ (eq 13-14), the marginal $P_t$ (eq 19) and the empirical mixture $p_t^{(n)}$ (eq 18).

A state is an array of shape `(..., k, d)`: $k$ modalities of dimension $d$.
"""

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import as_float, concrete
from .._linalg import kron_apply
from ..theory.mixture import TwoClassMixture
from ..theory.moments import MomentPath, marginal_moments


def realize_means(data: TwoClassMixture, dim: int, *, basis=None):
    r"""Class means $\mu(0)$ of shape `(k, dim)` whose per-dimension Gram matrix is `data.gram`.

    $\mu = \sqrt{d}\, L B^\top$ with $L L^\top = G_0$ (from `eigh`, so a singular Gram
    matrix such as $\theta = 0$ is fine) and $B$ a `(dim, k)` matrix with orthonormal
    columns: by default the first $k$ coordinate axes. The exact-score dynamics are
    rotation-equivariant, so the choice of $B$ changes nothing in law; pass `basis` to
    fix the means' directions (e.g. $\mathbf 1/\sqrt d$ for the $\mu = (1, \dots, 1)$ of
    Biroli et al. 2024).
    """
    k = data.k
    if not (isinstance(dim, int | np.integer) and dim >= k):
        raise ValueError(f"`dim` must be an integer >= k = {k} (the dimension of each modality), got {dim!r}.")
    lam, V = jnp.linalg.eigh(data.gram)
    L = V * jnp.sqrt(jnp.clip(lam, 0.0))
    if basis is None:
        basis = jnp.eye(dim, k, dtype=L.dtype)
    else:
        basis = as_float(basis, "basis")
        if basis.shape != (dim, k):
            raise ValueError(f"`basis` must have shape (dim, k) = ({dim}, {k}), got {basis.shape}.")
        B = concrete(basis)
        if B is not None and not np.allclose(B.T @ B, np.eye(k), atol=1e-6):
            raise ValueError("`basis` must have orthonormal columns (basis.T @ basis = I).")
    return jnp.sqrt(jnp.asarray(dim, L.dtype)) * L @ basis.T


realise_means = realize_means  # the name before the package settled on American spelling


def _labels_and_noise(key, means, n: int):
    """Fair class labels $\\pm 1$ and standard normal noise shaped like `n` copies of `means`."""
    k_s, k_z = jax.random.split(key)
    labels = jnp.where(jax.random.bernoulli(k_s, 0.5, (n,)), 1.0, -1.0).astype(means.dtype)
    return labels, jax.random.normal(k_z, (n,) + means.shape, means.dtype)


def sample_data(key, data: TwoClassMixture, means, n: int):
    r"""`n` draws from $P_0$ (eq 13-14): returns `(z, labels)`, `z` of shape `(n, k, d)`, labels $\pm 1$."""
    labels, noise = _labels_and_noise(key, means, n)
    return labels[:, None, None] * means + jnp.sqrt(data.variances)[:, None] * noise, labels


def sample_marginal(key, path: MomentPath, data: TwoClassMixture, means, t, n: int):
    r"""`n` exact draws from $P_t$ (eq 19): $\pm\mu(t) + (L_C \otimes I_d)\xi$, $L_C L_C^\top = C(t)$."""
    E, _, C = marginal_moments(path, t, data.variances)
    labels, noise = _labels_and_noise(key, means, n)
    mu = E @ means
    return labels[:, None, None] * mu + kron_apply(jnp.linalg.cholesky(C).astype(means.dtype), noise), labels


def sample_empirical(key, path: MomentPath, points, t, n: int):
    r"""`n` exact draws from $p_t^{(n)}$ (eq 18): a uniformly chosen training point, drifted, plus $N(0, Q(t))$."""
    E, Q = path(t)
    k_i, k_z = jax.random.split(key)
    i = jax.random.randint(k_i, (n,), 0, points.shape[0])
    noise = jax.random.normal(k_z, (n,) + points.shape[1:], points.dtype)
    L = jnp.linalg.cholesky(0.5 * (Q + Q.T)).astype(points.dtype)
    return kron_apply(E.astype(points.dtype), points[i]) + kron_apply(L, noise)
