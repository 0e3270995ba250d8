r"""Stability of the forward process and confinement of the reverse drift (eq 59-60)."""

import jax.numpy as jnp

from .._checks import check_same_k
from .._linalg import Mat, positive_stable
from .mixture import TwoClassMixture
from .moments import moments
from .ou import CoupledOU


def reverse_drift_matrix(ou: CoupledOU, C):
    r"""$M + \sigma_W^2 C^{-1}$: minus the linear part of the reverse drift (eq 22)."""
    ou.require_constant("reverse_drift_matrix")
    return (Mat.of(ou.M) + Mat.of(C).inv() * ou.sigma_w2).array()


def is_confining(ou: CoupledOU, data: TwoClassMixture, t):
    r"""Whether the reverse drift confines at time(s) `t` (eq 59).

    Checks that every eigenvalue of $M + \sigma_W^2 C(t)^{-1}$ has a positive real part
    (for symmetric M this is $\lambda_\pm + \sigma_W^2 / c_\pm(t) > 0$, eq 59; for a
    non-symmetric M it is linear stability of the reverse dynamics). Vectorised over `t`.
    """
    _, _, _, C = moments(ou, data, t)
    return positive_stable(Mat.of(reverse_drift_matrix(ou, C)))


def satisfies_eq60(ou: CoupledOU, data: TwoClassMixture):
    r"""The paper's sufficient condition (eq 60) $\sigma^2 < \sigma_W^2 / (\beta + |g|)$.

    Generalised to any symmetric M: $\max_i \sigma_i^2 < \sigma_W^2 / |\lambda_{\min}(M)|$.
    Raises for a non-symmetric M, where eq (60) does not apply (use [`is_confining`][]).
    """
    check_same_k(ou, data)
    ou.require_constant("satisfies_eq60")
    if ou.structure == "anisotropic":
        raise ValueError("eq (60) is stated for a symmetric M; use `is_confining` for the anisotropic M.")
    lam_min = jnp.linalg.eigvalsh(ou.M)[0]
    return jnp.max(data.variances) < ou.sigma_w2 / jnp.abs(lam_min)


def is_stable(ou: CoupledOU):
    """Whether every eigenvalue of M has a negative real part (Routh-Hurwitz, no eigensolver)."""
    ou.require_constant("is_stable")
    return positive_stable(-Mat.of(ou.M))
