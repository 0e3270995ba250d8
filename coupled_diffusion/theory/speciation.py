r"""Speciation: $\kappa(t)$ (eq 28, 62, 79), the speciation time $\kappa(t_S) = 1$ (eq 30),
the pure-mode closed form (eq 66, corrected), $\kappa(0)$ (eq 64, 85) and $g_{crit}(\theta)$.

One formula covers every M (see SCIENCE.md; eq 79 has a typo, it needs
$(M + \sigma_W^2 C^{-1})^{-1}$):

$$\kappa(t) = \sigma_W^2 \operatorname{tr}\big(C^{-1}(M + \sigma_W^2 C^{-1})^{-1} C^{-1} G(t)\big)
            = \sigma_W^2 \operatorname{tr}\big((C M C + \sigma_W^2 C)^{-1} G(t)\big),$$

per dimension (the paper's convention, threshold 1). The physical finite-$d$ criterion
is the unscaled $\kappa_d = d\,\kappa = 1$, asked for with `dim=d`; compare it, not the
per-dimension one, with a cloning experiment at finite $d$.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import as_float, concrete
from .._linalg import Mat, positive_stable, trace_mm
from .._results import RESULTS, Solution, finish
from . import _roots
from .mixture import TwoClassMixture
from .moments import SeriesCoefficients, _check_same_k, double, doublings_needed, scaled_gram, step_transition, transition_mat
from .ou import CoupledOU

_STEP_DOUBLINGS = 6  # residual steps are at most one grid step long


def _kappa_and_confinement(M: Mat, sigma_w2, variances, gram: Mat, E: Mat, Q: Mat):
    C = scaled_gram(E, variances) + Q
    G = E @ gram @ E.T
    A = C @ M @ C + C * sigma_w2
    kap = sigma_w2 * trace_mm(A.inv(), G)
    # eq 59: the reverse drift M + sigma_W^2 C^{-1} must be positive stable
    return kap, positive_stable(M + C.inv() * sigma_w2)


def _unpack(ou: CoupledOU, data: TwoClassMixture):
    """The solver's inputs as [`Mat`][]s / entry lists (the batched fast path)."""
    return Mat.of(ou.M), ou.sigma_w2, [data.variances[i] for i in range(data.k)], Mat.of(data.gram)


def _scale(dim, dtype):
    if dim is None:
        return jnp.asarray(1.0, dtype)
    dim = as_float(dim, "dim")
    d = concrete(dim)
    if d is not None and not (d.ndim == 0 and d >= 1):
        raise ValueError(f"`dim` must be a scalar >= 1 (the dimension d of each modality), got {d}.")
    return dim.astype(dtype)


def kappa(ou: CoupledOU, data: TwoClassMixture, t, *, dim=None):
    r"""$\kappa(t)$, vectorised over `t`.

    **Arguments:**

    - `ou`, `data`: the forward process and the data.
    - `t`: time(s) $\geq 0$.
    - `dim`: `None` (default) for the paper's per-dimension $\kappa$ (eq 62), or the
        modality dimension $d$ for the unscaled finite-$d$ $\kappa_d = d\,\kappa$ (eq 61).
    """
    _check_same_k(ou, data)
    if ou.time_dependent:  # moments from the ODE, M(t) in the reverse drift
        from .moments import MomentPath

        t = jnp.asarray(t, jnp.result_type(ou.sigma_w2, data.gram, float))
        path = MomentPath.of(ou, jnp.max(t))
        kap = jnp.vectorize(lambda tt: _kappa_td(path, ou, data, tt)[0])(t)
        return _scale(dim, t.dtype) * kap
    dtype = jnp.result_type(ou.M, data.gram)

    M, sw2, var, gram = _unpack(ou, data)

    def one(tt):
        E, Q = transition_mat(M, sw2, tt)
        return _kappa_and_confinement(M, sw2, var, gram, E, Q)[0]

    t = jnp.asarray(t, dtype)
    return _scale(dim, dtype) * jnp.vectorize(one)(t)


def speciation_time(
    ou: CoupledOU,
    data: TwoClassMixture,
    *,
    t_max=10.0,
    dim=None,
    grid_size: int = 64,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 32,
    throw: bool = True,
) -> Solution:
    r"""The speciation time: the largest $t \in (0, t_{max}]$ with $\kappa(t) = 1$ (eq 30).

    $\kappa$ is evaluated on a uniform grid of `grid_size` steps over $[0, t_{max}]$ by the
    exact OU semigroup; the last sign change of $\kappa - 1$ brackets the root, which a
    bracketed Newton solve (optimistix) refines. The result is differentiable in every
    parameter of `ou` and `data` (implicit function theorem), `jit`- and `vmap`-able.

    **Arguments:**

    - `ou`, `data`: the forward process and the data.
    - `t_max`: the horizon $T$ of the forward process.
    - `dim`: `None` for the per-dimension criterion (eq 30/62), or $d$ for $d\,\kappa = 1$.
    - `grid_size`: number of bracketing steps (a double crossing inside one step is not seen).
    - `rtol`, `atol`: Newton tolerances (default 1e-12 in float64, 1e-6 in float32).
    - `max_steps`: Newton iteration cap.
    - `throw`: raise on failure (default); `False` returns NaN and a result code.

    **Returns:**

    A [`Solution`][] with `value` $t_S$, `found`, and `result`: `no_speciation`
    ($\kappa < 1$ on $[0, t_{max}]$, eq 83), `speciation_beyond_t_max`, `non_confining`
    (eq 59 fails on the grid), `unstable` ($\beta \le |g|$), `invalid_parameters`.
    """
    _check_same_k(ou, data)
    dtype = jnp.result_type(ou.sigma_w2, data.gram, float)
    t_max = as_float(t_max, "t_max").astype(dtype)
    tm = concrete(t_max)
    if tm is not None and not (tm.ndim == 0 and tm > 0 and jnp.isfinite(tm)):
        raise ValueError(f"`t_max` must be a finite scalar > 0, got {tm}.")
    scale = _scale(dim, dtype)
    rtol, atol = _roots.tolerances(dtype, rtol, atol)
    core = _speciation_core_td if ou.time_dependent else _speciation_core
    value, result = core(ou, data, t_max, scale, grid_size=grid_size, rtol=rtol, atol=atol, max_steps=max_steps)
    return finish(value, result, throw=throw, what="speciation_time")


@eqx.filter_jit
def _speciation_core(ou, data, t_max, scale, *, grid_size, rtol, atol, max_steps):
    dtype = t_max.dtype

    dt = t_max / grid_size
    M, sw2, var, gram = _unpack(ou, data)
    E_step, Q_step = transition_mat(M, sw2, dt)
    like = jnp.zeros_like(dt)

    # scan kappa on the grid, keeping the state at the last point with kappa >= 1
    def grid_step(carry, _):
        E, Q, E_at, Q_at = carry
        kap, conf = _kappa_and_confinement(M, sw2, var, gram, E, Q)
        above = scale * kap >= 1.0
        carry = (*step_transition(E_step, Q_step, E, Q), E.where(above, E_at), Q.where(above, Q_at))
        return carry, (scale * kap - 1.0, conf)

    eye, zeros = Mat.eye(ou.k, like), Mat.zeros(ou.k, like)
    (_, _, E_j, Q_j), (F, confs) = jax.lax.scan(grid_step, (eye, zeros, eye, zeros), None, length=grid_size + 1)
    j = _roots.last_crossing(F)
    jc = jnp.clip(j, 0, grid_size - 1)
    bracketed = (j >= 0) & (j < grid_size)

    # in the bracket: (E, Q)(t_j + h) = step(h) o (E, Q)(t_j), with the step's series
    # coefficients computed once and a fixed number s of doublings (h <= dt)
    s = jnp.clip(doublings_needed(M, dt), 0, _STEP_DOUBLINGS)

    def residual(h, a):
        M_, sw2_, var_, gram_, series, s_, scale_, E0, Q0 = a
        E_h, Q_h = double(*series(h * jnp.exp2(-s_)), s_, _STEP_DOUBLINGS)
        E, Q = step_transition(E_h, Q_h, E0, Q0)
        return scale_ * _kappa_and_confinement(M_, sw2_, var_, gram_, E, Q)[0] - 1.0

    valid = (
        data.valid()
        & jnp.all(jnp.isfinite(ou.M))
        & (ou.sigma_w2 > 0)
        & (t_max > 0)
        & jnp.all(jnp.isfinite(F))
    )
    stable = ou.stable()
    confining = jnp.all(confs)
    # the in-bracket residual uses a short doubling loop: check the step is within its reach
    fine = doublings_needed(M, dt) <= _STEP_DOUBLINGS
    ok = valid & stable & confining & bracketed & fine
    h, optx_result = _roots.bracketed_newton(
        residual,
        (M, sw2, var, gram, SeriesCoefficients.of(M, sw2), s, scale, E_j, Q_j),
        jnp.zeros((), dtype),
        dt,
        F[jc],
        F[jc + 1],
        ok,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
    )
    value = jc * dt + h
    result = RESULTS.where(ok, RESULTS.promote(optx_result), RESULTS.successful)
    result = RESULTS.where(j == grid_size, RESULTS.speciation_beyond_t_max, result)
    result = RESULTS.where(j < 0, RESULTS.no_speciation, result)
    result = RESULTS.where(confining, result, RESULTS.non_confining)
    result = RESULTS.where(fine, result, RESULTS.grid_too_coarse)
    result = RESULTS.where(stable, result, RESULTS.unstable)
    result = RESULTS.where(valid, result, RESULTS.invalid_parameters)
    return value, result


def _kappa_td(path, ou, data, t):
    """kappa and the confinement flag at scalar t for a time-dependent M (moments from the ODE path)."""
    E, Q = path(t)
    M = Mat.of(ou.drift_matrix(t).astype(E.dtype))
    var = [data.variances[i] for i in range(data.k)]
    return _kappa_and_confinement(M, ou.sigma_w2, var, Mat.of(data.gram), Mat.of(E), Mat.of(Q))


@eqx.filter_jit
def _speciation_core_td(ou, data, t_max, scale, *, grid_size, rtol, atol, max_steps):
    """Time-dependent M: kappa from the dense ODE moments on the grid, then bracketed Newton."""
    from .moments import MomentPath

    dtype = t_max.dtype
    path = MomentPath.of(ou, t_max)
    ts = jnp.linspace(jnp.zeros((), dtype), t_max, grid_size + 1)
    kaps, confs = jax.vmap(lambda t: _kappa_td(path, ou, data, t))(ts)
    F = scale * kaps - 1.0
    j = _roots.last_crossing(F)
    jc = jnp.clip(j, 0, grid_size - 1)
    bracketed = (j >= 0) & (j < grid_size)

    def residual(t, a):
        path_, ou_, data_, scale_ = a
        return scale_ * _kappa_td(path_, ou_, data_, t)[0] - 1.0

    valid = data.valid() & (ou.sigma_w2 > 0) & (t_max > 0) & jnp.all(jnp.isfinite(F))
    stable = ou.stable()
    confining = jnp.all(confs)
    ok = valid & stable & confining & bracketed
    value, optx_result = _roots.bracketed_newton(
        residual, (path, ou, data, scale), ts[jc], ts[jc + 1], F[jc], F[jc + 1], ok, rtol=rtol, atol=atol, max_steps=max_steps
    )
    result = RESULTS.where(ok, RESULTS.promote(optx_result), RESULTS.successful)
    result = RESULTS.where(j == grid_size, RESULTS.speciation_beyond_t_max, result)
    result = RESULTS.where(j < 0, RESULTS.no_speciation, result)
    result = RESULTS.where(confining, result, RESULTS.non_confining)
    result = RESULTS.where(stable, result, RESULTS.unstable)
    result = RESULTS.where(valid, result, RESULTS.invalid_parameters)
    return value, result


# ---------------------------------------------------------------------------------------
# Eigenmodes of a symmetric M (eq 50-66)


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


def _mode_setup(ou: CoupledOU, data: TwoClassMixture):
    _check_same_k(ou, data)
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
    lam, m2, sigma2, _ = _mode_setup(ou, data)
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
    lam, m2, sigma2, decomposable = _mode_setup(ou, data)
    dtype = lam.dtype
    m2 = _scale(dim, dtype) * m2
    sw2 = ou.sigma_w2
    stable = (lam < 0) & ou.stable()
    lam_s = jnp.where(stable, lam, -1.0)
    B = sigma2 + sw2 / (2 * lam_s)
    a = sw2 / (2 * jnp.abs(lam_s) * (m2 + jnp.sqrt(m2**2 + B**2)))
    t = jnp.log(a) / (2 * lam_s)
    confining = sigma2 < sw2 / jnp.abs(lam_s)  # eq 59 for all t, since c(t) is monotone
    out = []
    for i in range(lam.shape[0]):
        result = RESULTS.where((m2[i] > 0) & (a[i] < 1), RESULTS.successful, RESULTS.no_speciation)
        result = RESULTS.where(confining[i], result, RESULTS.non_confining)
        result = RESULTS.where(stable[i], result, RESULTS.unstable)
        result = RESULTS.where(decomposable, result, RESULTS.not_mode_decomposable)
        out.append(finish(t[i], result, throw=throw, what=f"mode_speciation_times (mode {i})"))
    return tuple(out)


def kappa_zero(ou: CoupledOU, data: TwoClassMixture, *, dim=None):
    r"""$\kappa(0) = \sigma_W^2 \operatorname{tr}((\Sigma_0 M \Sigma_0 + \sigma_W^2 \Sigma_0)^{-1} G_0)$.

    Equals eq (64) for the symmetric M and eq (85) for the anisotropic M (equal
    variances). When eq (60) holds $\kappa$ is largest at $t = 0$, so $\kappa(0) < 1$
    means no speciation at all (eq 64).
    """
    return kappa(ou, data, 0.0, dim=dim)


def g_crit(theta, *, beta=1.0, sigma_w2=2.0, m_x2=1.0, m_y2=1.0, variance=1.0):
    r"""The anisotropic critical coupling $g_{crit}(\theta)$ from $\kappa(0) = 1$ (eq 85).

    Eq (85) is linear in $g$: with $r = \sigma_W^2/\sigma^2$,
    $g_{crit} = \big(\frac{r (m_x^2 + m_y^2)}{\sigma^2 (r - \beta)} - 1\big)
    \frac{\sigma^2 (r - \beta)^2}{r\, m_x m_y \cos\theta}$.
    Past it ($g > g_{crit}$, for $\cos\theta > 0$) $\kappa(0) < 1$. Returns $+\infty$ where
    no non-negative $g$ brings $\kappa(0)$ down to 1. Vectorised over `theta`.
    """
    theta = jnp.asarray(theta, jnp.result_type(float))
    r = sigma_w2 / variance
    base = r * (m_x2 + m_y2) / (variance * (r - beta)) - 1.0
    slope = r * jnp.sqrt(m_x2 * m_y2) * jnp.cos(theta) / (variance * (r - beta) ** 2)
    g = base / jnp.where(slope == 0, 1.0, slope)
    return jnp.where((slope > 0) & (g >= 0), g, jnp.inf)
