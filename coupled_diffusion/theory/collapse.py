r"""Collapse (memorisation) times from the Random Energy Model (eq 31-49, 67-78, 86-89).

**Convention.** $\alpha = \log(n) / D$, where $D$ is the dimension of the system whose
posterior weights condense: $D = k d$ for the joint system (eq 33 with $k = 2$:
$\alpha = \log n / (2d)$), and $D = d$ for a single eigenmode (eq 77-78) or for $y$
given $x$ (eq 87, "the prefactor is twice since the effective dimension is $d$"). With it
the REM gives, for every M,

- joint: $\alpha = \frac{1}{2k} \log \frac{\det C(t_C)}{\det Q(t_C)}$ (eq 73/86 for $k=2$);
- conditional: $\alpha = \frac12 \log \frac{C_{y|x}}{Q_{y|x}}$ (eq 87-89);
- mode: $\alpha = \frac12 \log(1 + \chi_\pm)$, i.e. eq (78) with $n^{1/d} \to e^{2\alpha}$.

The printed eq (77) reads $n^{1/d} = 1 + \chi_\pm$; the per-mode REM with the paper's own
CGF (eq 119) gives $n^{2/d} = 1 + \chi_\pm$ for $n$ points in a $d$-dimensional mode,
which is eq (78) with $\alpha = \log n / d$. For one $(n, d)$ use [`alpha_from_n`][] with
the right $D$: the joint $\alpha$ is half the per-mode one.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from .._checks import as_float, check_same_k, concrete
from .._linalg import Mat, trace_mm
from .._results import RESULTS, Solution, finish
from . import _roots
from ._semigroup import SeriesCoefficients, covariances
from .mixture import TwoClassMixture
from .modes import mode_decomposition
from .moments import MomentPath
from .ou import CoupledOU


def alpha_from_n(n, dim):
    r"""$\alpha = \log(n) / D$ for $n$ training points in a system of dimension $D$."""
    return jnp.log(jnp.asarray(n, jnp.result_type(float))) / dim


def _SQC(ou, data, t, series=None) -> tuple[Mat, Mat, Mat]:
    _, Q, S, C = covariances(Mat.of(ou.M), ou.sigma_w2, [data.variances[i] for i in range(data.k)], t, series)
    return S, Q, C


def rem_cgf(ou: CoupledOU, data: TwoClassMixture, t, beta):
    r"""The REM cumulant generating function $\Lambda_t(\beta)$ (eq 34, 68, 119), any M.

    $\Lambda_t(\beta) = -\frac{1}{2k}\log\det(I + \beta Q^{-1} S)
    - \frac{\beta}{2k}\operatorname{tr}\big((Q + \beta S)^{-1} C\big)$, which is eq (68)
    for the symmetric $k = 2$ case ($Q^{-1}S$ has eigenvalues $\chi_\pm$, eq 67).
    Vectorised over `t` and `beta` (broadcast).
    """
    check_same_k(ou, data)
    ou.require_constant("rem_cgf")
    k = ou.k

    def one(tt, b):
        S, Q, C = _SQC(ou, data, tt)
        # det(I + b Q^-1 S) = det(Q + b S) / det(Q)
        QbS = Q + S * b
        return -(jnp.log(QbS.det()) - jnp.log(Q.det())) / (2 * k) - b * trace_mm(QbS.inv(), C) / (2 * k)

    dtype = jnp.result_type(ou.M, float)
    return jnp.vectorize(one)(jnp.asarray(t, dtype), jnp.asarray(beta, dtype))


def rem_rate(ou: CoupledOU, data: TwoClassMixture, t, u, *, rtol=None, atol=None):
    r"""The REM rate function $I_t(u) = \sup_\beta(-u\beta - \Lambda_t(\beta))$ (eq 35).

    The supremum is where $\Lambda_t'(\beta) = -u$; it is found by bisection (optimistix)
    in $v = \log(\beta - \beta_{min})$, where $\beta_{min} = -1/\lambda_{max}(Q^{-1}S)$ bounds
    the domain of $\Lambda_t$. Returns $+\infty$ for $u \le 0$ (energies are
    non-negative). Scalar `t` and `u`; `jax.vmap` for batches.
    """
    ou.require_constant("rem_rate")
    dtype = jnp.result_type(ou.M, float)
    t, u = jnp.asarray(t, dtype), jnp.asarray(u, dtype)
    rtol, atol = _roots.tolerances(dtype, rtol, atol)
    S, Q, _ = (X.array() for X in _SQC(ou, data, t))
    R = _sym_sqrt_inv(Q)
    chi_max = jnp.max(jnp.linalg.eigvalsh(R @ S @ R))  # largest eigenvalue of Q^-1 S
    beta_min = -1.0 / jnp.maximum(chi_max, 1e-300)
    dcgf = jax.grad(lambda b, tt: rem_cgf(ou, data, tt, b))

    def fn(v, a):
        uu, tt = a
        return dcgf(beta_min + jnp.exp(v), tt) + uu

    sol = optx.root_find(
        fn,
        optx.Bisection(rtol=rtol, atol=atol, expand_if_necessary=True),
        jnp.log(1.0 - beta_min),
        args=(u, t),
        options=dict(lower=jnp.asarray(-30.0, dtype), upper=jnp.asarray(30.0, dtype)),
        max_steps=512,
        throw=False,
    )
    b = beta_min + jnp.exp(sol.value)
    val = -u * b - rem_cgf(ou, data, t, b)
    return jnp.where(u > 0, val, jnp.inf)


def _sym_sqrt_inv(Q):
    lam, V = jnp.linalg.eigh(Q)
    return (V / jnp.sqrt(lam)) @ V.T


class _Covariances(eqx.Module):
    """`(Q(t), C(t))` as [`Mat`][]s: the closed form for a constant M (series coefficients computed once), or the ODE path."""

    path: MomentPath | None
    M: Mat | None
    series: SeriesCoefficients | None
    sigma_w2: jax.Array
    variances: jax.Array

    @classmethod
    def of(cls, ou: CoupledOU, data: TwoClassMixture, t_max):
        if ou.time_dependent:
            return cls(MomentPath.of(ou, t_max), None, None, ou.sigma_w2, data.variances)
        M = Mat.of(ou.M)
        return cls(None, M, SeriesCoefficients.of(M, ou.sigma_w2), ou.sigma_w2, data.variances)

    def __call__(self, t) -> tuple[Mat, Mat]:
        if self.path is None:
            var = [self.variances[i] for i in range(self.variances.shape[0])]
            _, Q, _, C = covariances(self.M, self.sigma_w2, var, t, self.series)
            return Q, C
        E, Q = self.path(t)
        return Mat.of(Q), Mat.of(E @ (self.variances[:, None] * E.T) + Q)


def _collapse_lhs(Q: Mat, C: Mat, conditional: bool, target: int):
    if not conditional:
        return (jnp.log(C.det()) - jnp.log(Q.det())) / (2 * C.k)
    return 0.5 * (jnp.log(_schur(C, target)) - jnp.log(_schur(Q, target)))


def _schur(A: Mat, target: int):
    """Conditional variance of block `target` given all the others (eq 88-89): det A / det A_rest."""
    rest = [i for i in range(A.k) if i != target]
    return A.det() / Mat([[A[i, j] for j in rest] for i in rest]).det()


def collapse_time(
    ou: CoupledOU,
    data: TwoClassMixture,
    *,
    alpha,
    conditional: bool = False,
    target: int = -1,
    t_min=1e-8,
    t_max=100.0,
    grid_size: int = 64,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 32,
    throw: bool = True,
) -> Solution:
    r"""The collapse time $t_C$: the largest $t$ where the REM condensation condition holds.

    Joint (default): $\alpha = \frac{1}{2k}\log(\det C/\det Q)$ (eq 73/86), $\alpha = \log n/(kd)$.
    `conditional=True`: modality `target` (default the last, $y$) given the others,
    $\alpha = \frac12 \log(C_{y|x}/Q_{y|x})$ (eq 87-89), $\alpha = \log n / d$.

    The condition is bracketed on a logarithmic grid of `grid_size` points over
    $[t_{min}, t_{max}]$, then solved by bracketed Newton in $\log t$ (optimistix);
    differentiable in `alpha` and in every parameter of `ou` and `data`.

    **Returns:** a [`Solution`][]; `no_collapse` for $\alpha \le 0$, `collapse_out_of_range`
    when the condition is not crossed in $[t_{min}, t_{max}]$, `unstable`, `invalid_parameters`.
    """
    check_same_k(ou, data)
    if conditional and ou.k < 2:
        raise ValueError("`conditional=True` needs k >= 2 modalities.")
    if not (isinstance(target, int | np.integer) and -ou.k <= target < ou.k):
        raise ValueError(f"`target` must index one of the k = {ou.k} modalities (-{ou.k} <= target < {ou.k}), got {target!r}.")
    target = int(target) % ou.k
    dtype = jnp.result_type(ou.sigma_w2, data.gram, float)
    alpha = as_float(alpha, "alpha").astype(dtype)
    a = concrete(alpha)
    if a is not None and not np.all(np.isfinite(a)):
        raise ValueError(f"`alpha` must be finite (alpha = log(n) / D > 0, see `alpha_from_n`), got {a.tolist()}.")
    t_min = as_float(t_min, "t_min").astype(dtype)
    t_max = as_float(t_max, "t_max").astype(dtype)
    lo, hi = concrete(t_min), concrete(t_max)
    if lo is not None and hi is not None and not (0 < lo < hi and jnp.isfinite(hi)):
        raise ValueError(f"Need 0 < t_min < t_max < inf, got t_min={lo}, t_max={hi}.")
    options = _roots.Options.of(dtype, grid_size=grid_size, rtol=rtol, atol=atol, max_steps=max_steps, min_grid_size=2)
    logt, result = _collapse_core(ou, data, alpha, t_min, t_max, conditional=conditional, target=target, options=options)
    return finish(jnp.exp(logt), result, throw=throw, what="collapse_time")


@eqx.filter_jit
def _collapse_core(ou, data, alpha, t_min, t_max, *, conditional, target, options: _roots.Options):
    def residual(logt, a):
        cov, alpha_ = a
        return _collapse_lhs(*cov(jnp.exp(logt)), conditional, target) - alpha_

    args = (_Covariances.of(ou, data, t_max), alpha)
    u = jnp.linspace(jnp.log(t_min), jnp.log(t_max), options.grid_size)
    F = jax.vmap(lambda uu: residual(uu, args))(u)
    finite_M = jnp.asarray(True) if ou.time_dependent else jnp.all(jnp.isfinite(ou.M))
    valid = data.valid() & finite_M & (ou.sigma_w2 > 0) & jnp.isfinite(alpha)
    checks = [(valid, RESULTS.invalid_parameters), (ou.stable(), RESULTS.unstable), (alpha > 0, RESULTS.no_collapse),
              (jnp.all(jnp.isfinite(F)), RESULTS.collapse_out_of_range)]
    logt, _, result = _roots.solve_last_crossing(
        residual, args, F, lambda jc: (u[jc], u[jc + 1]), checks, no_crossing=RESULTS.collapse_out_of_range,
        crossing_at_end=RESULTS.collapse_out_of_range, options=options,
    )
    return logt, result


def collapse_time_bound(ou: CoupledOU, data: TwoClassMixture, *, alpha):
    r"""Upper bound on the joint collapse time (eq 75): $t_C \le \frac{\sigma^2/\sigma_W^2}{e^{2\alpha} - 1}$.

    From $e^x - 1 \ge x$; exact at $g = 0$. Holds for any stable symmetric M with equal
    variances and any $k$ (with $\alpha = \log n/(kd)$), and for each mode (eq 78).
    """
    _, _, sigma2, _ = mode_decomposition(ou, data)
    alpha = as_float(alpha, "alpha")
    return jnp.where(alpha > 0, (sigma2 / ou.sigma_w2) / jnp.expm1(2 * alpha), jnp.inf)
