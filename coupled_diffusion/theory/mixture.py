"""The two-class Gaussian mixture data of eq (13)-(14), summarised by a Gram matrix."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._checks import as_float, check_finite, check_positive, check_square, concrete
from .._types import KVec, KxK, ScalarLike


class TwoClassMixture(eqx.Module):
    r"""Data $\frac12 N(+\mu, \Sigma_0) + \frac12 N(-\mu, \Sigma_0)$ with $k$ modalities.

    Everything the theory needs from the means is the $k \times k$ Gram matrix of the
    per-modality means, per dimension: $G_0[i, j] = \mu_i(0) \cdot \mu_j(0) / d$, so
    $m_x^2 = G_0[0, 0]$ and $\cos\theta = G_0[0, 1] / (m_x m_y)$ (eq 82).

    **Arguments:**

    - `gram`: symmetric positive semi-definite $k \times k$ Gram matrix $G_0$.
    - `variances`: the $k$ per-modality data variances, $\Sigma_0 = \mathrm{diag}$ (eq 14).
    """

    gram: KxK
    variances: KVec

    def __init__(self, gram, variances):
        gram = as_float(gram, "gram")
        check_square(gram, "gram")
        variances = as_float(variances, "variances")
        if variances.shape != (gram.shape[0],):
            raise ValueError(
                f"`variances` must have shape ({gram.shape[0]},) to match the "
                f"{gram.shape[0]} x {gram.shape[0]} `gram`, got shape {variances.shape}."
            )
        check_finite(gram, "gram")
        check_finite(variances, "variances")
        check_positive(variances, "variances", "strictly positive (a data variance)")
        G = concrete(gram)
        if G is not None:
            scale = max(1.0, float(np.max(np.abs(G))))
            if not np.allclose(G, G.T, rtol=0, atol=1e-10 * scale):
                raise ValueError(f"`gram` must be symmetric, got {G.tolist()}.")
            lam = np.linalg.eigvalsh(0.5 * (G + G.T))
            if lam.min() < -1e-10 * scale:
                raise ValueError(
                    f"`gram` must be positive semi-definite (a Gram matrix of means); its "
                    f"smallest eigenvalue is {lam.min():.3g}. For two modalities this "
                    f"means |G[0,1]| <= sqrt(G[0,0] G[1,1])."
                )
        dtype = jnp.result_type(gram, variances)
        self.gram = gram.astype(dtype)
        self.variances = variances.astype(dtype)

    @classmethod
    def from_angle(
        cls,
        m_x2: ScalarLike,
        m_y2: ScalarLike,
        theta: ScalarLike,
        variances=(1.0, 1.0),
    ) -> "TwoClassMixture":
        r"""Two modalities with per-dimension mean norms $m_x^2, m_y^2$ at angle $\theta$ (eq 82)."""
        m_x2, m_y2, theta = (as_float(v, n) for v, n in ((m_x2, "m_x2"), (m_y2, "m_y2"), (theta, "theta")))
        for v, n in ((m_x2, "m_x2"), (m_y2, "m_y2"), (theta, "theta")):
            if v.ndim != 0:
                raise ValueError(f"`{n}` must be a scalar, got shape {v.shape}.")
            check_finite(v, n)
        for v, n in ((m_x2, "m_x2"), (m_y2, "m_y2")):
            c = concrete(v)
            if c is not None and c < 0:
                raise ValueError(f"`{n}` is a squared norm and must be >= 0, got {float(c)}.")
        cross = jnp.sqrt(m_x2 * m_y2) * jnp.cos(theta)
        gram = jnp.stack([jnp.stack([m_x2, cross]), jnp.stack([cross, m_y2])])
        return cls(gram, jnp.broadcast_to(as_float(variances, "variances"), (2,)))

    @classmethod
    def from_means(cls, means, variances) -> "TwoClassMixture":
        r"""From explicit class means, one row per modality: `means` has shape (k, d)."""
        means = as_float(means, "means")
        if means.ndim != 2:
            raise ValueError(f"`means` must have shape (k, d), got {means.shape}.")
        return cls(means @ means.T / means.shape[1], variances)

    @property
    def k(self) -> int:
        return self.gram.shape[0]

    def valid(self):
        """Traced validity flag (finite, positive variances, PSD Gram)."""
        lam = jnp.linalg.eigvalsh(0.5 * (self.gram + self.gram.T))
        scale = jnp.maximum(1.0, jnp.max(jnp.abs(self.gram)))
        return (
            jnp.all(jnp.isfinite(self.gram))
            & jnp.all(jnp.isfinite(self.variances))
            & jnp.all(self.variances > 0)
            & (jnp.min(lam) >= -1e-6 * scale)
        )
