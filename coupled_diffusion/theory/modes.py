r"""The eigenmodes of a symmetric M and their closed forms (eq 50-66, 77-78).

A symmetric M with equal data variances decouples into independent one-dimensional OU
processes along its orthonormal eigenvectors $v_i$, with rates $\lambda_i$ and per-dimension
mean norms $m_i^2 = v_i^\top G_0 v_i$. For eq (2) these are the common mode
$v_+ = (1, 1)/\sqrt2$, $\lambda_+ = -\beta + g$, and the difference mode
$v_- = (1, -1)/\sqrt2$, $\lambda_- = -\beta - g$ (eq 50-51). Each mode then has its own
signal-to-noise ratio (eq 63), speciation time (eq 66, corrected) and collapse time (eq 78);
their differences are the synchronization gap.
"""

import jax.numpy as jnp
import numpy as np

from .._checks import as_float, check_same_k, concrete, dim_scale
from .._results import RESULTS, finish, first_failure
from .mixture import TwoClassMixture
from .ou import CoupledOU


def eigenmodes(ou: CoupledOU):
    r"""Eigenvalues and orthonormal eigenvectors (columns) of a symmetric M.

    For the symmetric constructor (eq 2) the order is the paper's: common mode
    $v_+ = (1, 1)/\sqrt2$ with $\lambda_+ = -\beta + g$, then difference mode
    $v_- = (1, -1)/\sqrt2$ with $\lambda_- = -\beta - g$ (eq 50-51), whatever the sign of
    $g$. For another symmetric M the order is by decreasing eigenvalue (slowest first).
    """
    ou.require_constant("eigenmodes")
    if ou.structure == "anisotropic":
        raise ValueError("The anisotropic M of eq (3) is defective: it has no eigenbasis.")
    if ou.structure == "symmetric":
        s = 1.0 / jnp.sqrt(jnp.asarray(2.0, ou.M.dtype))
        V = jnp.array([[s, s], [s, -s]], ou.M.dtype)
        lam = jnp.stack([-ou.beta + ou.g, -ou.beta - ou.g])
        return lam, V
    M = concrete(ou.M)
    if M is not None and not np.allclose(M, M.T):
        raise ValueError(f"The eigenmode formulas need a symmetric M, got {M.tolist()}.")
    lam, V = jnp.linalg.eigh(0.5 * (ou.M + ou.M.T))
    return lam[::-1], V[:, ::-1]


def mode_decomposition(ou: CoupledOU, data: TwoClassMixture):
    r"""`(lam, m2, sigma2, decomposable)`: the eigenvalues, the per-mode $m_i^2 = v_i^\top G_0 v_i$,
    the common data variance, and a traced flag that the inputs really decompose.

    Raises when M is known not to be symmetric or the variances not to be equal; under
    `jit` the flag carries that check instead (the solvers report `not_mode_decomposable`).
    """
    check_same_k(ou, data)
    lam, V = eigenmodes(ou)
    var = concrete(data.variances)
    if var is not None and not np.allclose(var, var[0]):
        raise ValueError(
            f"The eigenmode formulas need equal data variances (sigma_x^2 = sigma_y^2), got {var.tolist()}."
        )
    sigma2 = data.variances[0]
    decomposable = jnp.all(data.variances == sigma2) & jnp.allclose(ou.M, ou.M.T)
    m2 = jnp.diagonal(V.T @ data.gram @ V)
    return lam, m2, sigma2, decomposable


def mode_snrs(ou: CoupledOU, data: TwoClassMixture, t):
    r"""Per-eigenmode signal-to-noise ratios $\mathrm{SNR}_i(t)$ (eq 62-63), shape `t.shape + (k,)`.

    $\kappa(t) = \sigma_W^2 \sum_i \mathrm{SNR}_i(t)$ with
    $\mathrm{SNR}_i = e^{2\lambda_i t} m_i^2 / (c_i (\lambda_i c_i + \sigma_W^2))$ and
    $c_i(t) = \sigma^2 e^{2\lambda_i t} + \sigma_W^2 (e^{2\lambda_i t} - 1)/(2\lambda_i)$ (eq 55).
    Needs a symmetric M and equal variances.
    """
    lam, m2, sigma2, _ = mode_decomposition(ou, data)
    t = jnp.asarray(t, lam.dtype)[..., None]
    a = jnp.exp(2 * lam * t)
    c = sigma2 * a + ou.sigma_w2 * jnp.expm1(2 * lam * t) / (2 * lam)
    return a * m2 / (c * (lam * c + ou.sigma_w2))


def mode_speciation_times(ou: CoupledOU, data: TwoClassMixture, *, dim=None, throw: bool = True):
    r"""Speciation time of each eigenmode alone, $\sigma_W^2 \mathrm{SNR}_\pm(t) = 1$ (eq 65-66).

    Eq (66) as printed takes the wrong root for $\lambda < 0$. With $a = e^{2\lambda t}$ and
    $B = \sigma^2 + \sigma_W^2/(2\lambda)$ the condition is
    $\lambda B^2 a^2 - \sigma_W^2 m^2 a - \sigma_W^4/(4\lambda) = 0$, whose admissible root,
    written without cancellation, is
    $a = \sigma_W^2 / \big(2|\lambda| (m^2 + \sqrt{m^4 + B^2})\big)$: this also covers
    $B = 0$ (where the printed form is 0/0), giving $a = \sigma_W^2/(4|\lambda| m^2)$.
    Then $t = \log(a) / (2\lambda)$.

    **Returns:** a tuple of [`Solution`][]s, one per mode in [`eigenmodes`][] order
    (`(ts_plus, ts_minus)` for eq 2). A mode with $m^2 = 0$ or $\kappa_{mode}(0) \le 1$
    reports `no_speciation`; a mode violating eq (59) reports `non_confining`.
    """
    lam, m2, sigma2, decomposable = mode_decomposition(ou, data)
    dtype = lam.dtype
    m2 = dim_scale(dim, dtype) * m2
    sw2 = ou.sigma_w2
    stable = (lam < 0) & ou.stable()
    lam_s = jnp.where(stable, lam, -1.0)
    B = sigma2 + sw2 / (2 * lam_s)
    a = sw2 / (2 * jnp.abs(lam_s) * (m2 + jnp.sqrt(m2**2 + B**2)))
    t = jnp.log(a) / (2 * lam_s)
    confining = sigma2 < sw2 / jnp.abs(lam_s)  # eq 59 for all t, since c(t) is monotone
    out = []
    for i in range(lam.shape[0]):
        result = first_failure([(decomposable, RESULTS.not_mode_decomposable), (stable[i], RESULTS.unstable),
                                (confining[i], RESULTS.non_confining), ((m2[i] > 0) & (a[i] < 1), RESULTS.no_speciation)],
                               RESULTS.successful)
        out.append(finish(t[i], result, throw=throw, what=f"mode_speciation_times (mode {i})"))
    return tuple(out)


def mode_collapse_times(ou: CoupledOU, data: TwoClassMixture, *, alpha, throw: bool = True):
    r"""Collapse time of each eigenmode of a symmetric M (eq 77-78), closed form.

    $t_{C,\pm} = \frac{1}{\tau_\pm}\log\big(1 + \frac{\sigma^2}{\sigma_W^2}\frac{\tau_\pm}{e^{2\alpha} - 1}\big)$
    with $\tau_\pm = -2\lambda_\pm$ and the per-mode $\alpha = \log n / d$: the printed eq (77)
    reads $n^{1/d} = 1 + \chi_\pm$, but the per-mode REM with the paper's own CGF (eq 119)
    gives $n^{2/d} = 1 + \chi_\pm$ for $n$ points in a $d$-dimensional mode, i.e.
    $e^{2\alpha} = 1 + \chi_\pm$ (see `collapse.py`). Returns a tuple of [`Solution`][]s in
    [`eigenmodes`][] order (`(tc_plus, tc_minus)` for eq 2).
    """
    lam, _, sigma2, decomposable = mode_decomposition(ou, data)
    alpha = as_float(alpha, "alpha").astype(lam.dtype)
    tau = -2 * lam
    stable = (tau > 0) & ou.stable()
    tau_s = jnp.where(stable, tau, 1.0)
    r = sigma2 / ou.sigma_w2
    t = jnp.log1p(r * tau_s / jnp.expm1(2 * alpha)) / tau_s
    out = []
    for i in range(lam.shape[0]):
        result = first_failure([(decomposable, RESULTS.not_mode_decomposable), (stable[i], RESULTS.unstable),
                                (alpha > 0, RESULTS.no_collapse)], RESULTS.successful)
        out.append(finish(t[i], result, throw=throw, what=f"mode_collapse_times (mode {i})"))
    return tuple(out)
