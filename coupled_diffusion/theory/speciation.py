r"""Speciation: $\kappa(t)$ (eq 28, 62, 79), the speciation time $\kappa(t_S) = 1$ (eq 30),
$\kappa(0)$ (eq 64, 85) and the anisotropic critical coupling $g_{crit}(\theta)$ (eq 85).

One formula covers every M (eq 79 with its typo corrected: it needs
$(M + \sigma_W^2 C^{-1})^{-1}$):

$$\kappa(t) = \sigma_W^2 \operatorname{tr}\big(C^{-1}(M + \sigma_W^2 C^{-1})^{-1} C^{-1} G(t)\big)
            = \sigma_W^2 \operatorname{tr}\big((C M C + \sigma_W^2 C)^{-1} G(t)\big),$$

per dimension (the paper's convention, threshold 1). The physical finite-$d$ criterion
is the unscaled $\kappa_d = d\,\kappa = 1$ (eq 61), asked for with `dim=d`; compare it, not the
per-dimension one, with a cloning experiment at finite $d$. The closed forms of a symmetric
M's eigenmodes (eq 50-66) are in `modes.py`.
"""

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import as_float, check_same_k, check_times, concrete, dim_scale
from .._linalg import Mat, positive_stable, trace_mm
from .._results import RESULTS, Solution, finish
from . import _roots
from ._semigroup import SeriesCoefficients, double, doublings_needed, scaled_gram, step_transition, transition_mat
from .mixture import TwoClassMixture
from .moments import MomentPath
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


def _kappa_td(path, ou, data, t):
    """kappa and the confinement flag at scalar t for a time-dependent M (moments from the ODE path)."""
    E, Q = path(t)
    M = Mat.of(ou.drift_matrix(t).astype(E.dtype))
    var = [data.variances[i] for i in range(data.k)]
    return _kappa_and_confinement(M, ou.sigma_w2, var, Mat.of(data.gram), Mat.of(E), Mat.of(Q))


def kappa(ou: CoupledOU, data: TwoClassMixture, t, *, dim=None):
    r"""$\kappa(t)$, vectorised over `t`.

    **Arguments:**

    - `ou`, `data`: the forward process and the data.
    - `t`: time(s) $\geq 0$.
    - `dim`: `None` (default) for the paper's per-dimension $\kappa$ (eq 62), or the
        modality dimension $d$ for the unscaled finite-$d$ $\kappa_d = d\,\kappa$ (eq 61).
    """
    check_same_k(ou, data)
    check_times(t)
    ou.require_stable("kappa")
    if ou.time_dependent:  # moments from the ODE, M(t) in the reverse drift
        t = jnp.asarray(t, jnp.result_type(ou.sigma_w2, data.gram, float))
        path = MomentPath.of(ou, jnp.max(t))
        kap = jnp.vectorize(lambda tt: _kappa_td(path, ou, data, tt)[0])(t)
        return dim_scale(dim, t.dtype) * kap
    dtype = jnp.result_type(ou.M, data.gram)

    M, sw2, var, gram = _unpack(ou, data)

    def one(tt):
        E, Q = transition_mat(M, sw2, tt)
        return _kappa_and_confinement(M, sw2, var, gram, E, Q)[0]

    t = jnp.asarray(t, dtype)
    return dim_scale(dim, dtype) * jnp.vectorize(one)(t)


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
    check_same_k(ou, data)
    dtype = jnp.result_type(ou.sigma_w2, data.gram, float)
    t_max = as_float(t_max, "t_max").astype(dtype)
    tm = concrete(t_max)
    if tm is not None and not (tm.ndim == 0 and tm > 0 and jnp.isfinite(tm)):
        raise ValueError(f"`t_max` must be a finite scalar > 0, got {tm}.")
    options = _roots.Options.of(dtype, grid_size=grid_size, rtol=rtol, atol=atol, max_steps=max_steps)
    value, result = _speciation_core(ou, data, t_max, dim_scale(dim, dtype), options=options)
    return finish(value, result, throw=throw, what="speciation_time")


@eqx.filter_jit
def _speciation_core(ou, data, t_max, scale, *, options: _roots.Options):
    g = (_scheduled_grid if ou.time_dependent else _constant_grid)(ou, data, t_max, scale, options.grid_size)
    valid = data.valid() & g.finite & (ou.sigma_w2 > 0) & (t_max > 0) & jnp.all(jnp.isfinite(g.F))
    checks = [(valid, RESULTS.invalid_parameters), (ou.stable(), RESULTS.unstable), *g.checks,
              (g.confining, RESULTS.non_confining)]
    value, jc, result = _roots.solve_last_crossing(
        g.residual, g.args, g.F, g.bracket, checks, no_crossing=RESULTS.no_speciation,
        crossing_at_end=RESULTS.speciation_beyond_t_max, options=options,
    )
    return g.start(jc) + value, result


class _Grid(NamedTuple):
    """One speciation problem on its bracketing grid: what the shared pipeline needs."""

    F: jax.Array  # kappa - 1 on the grid
    confining: jax.Array  # eq 59 on the whole grid
    finite: jax.Array  # the drift's parameters are finite
    checks: list  # solver-specific (ok, code) pairs, between stability and confinement in precedence
    residual: Callable
    args: tuple
    bracket: Callable  # jc -> (lower, upper) of the Newton unknown
    start: Callable  # jc -> the time the Newton unknown is measured from


def _constant_grid(ou, data, t_max, scale, grid_size):
    """Constant M: kappa on the grid by stepping the exact semigroup, keeping the state at the last kappa >= 1.

    The Newton unknown is the offset $h \in [0, dt]$ from the bracketing grid point $t_j$:
    $(E, Q)(t_j + h) = \mathrm{step}(h) \circ (E, Q)(t_j)$, with the step's series
    coefficients computed once and a fixed number of doublings ($h \le dt$).
    """
    dt = t_max / grid_size
    M, sw2, var, gram = _unpack(ou, data)
    E_step, Q_step = transition_mat(M, sw2, dt)
    like = jnp.zeros_like(dt)

    def grid_step(carry, _):
        E, Q, E_at, Q_at = carry
        kap, conf = _kappa_and_confinement(M, sw2, var, gram, E, Q)
        above = scale * kap >= 1.0
        carry = (*step_transition(E_step, Q_step, E, Q), E.where(above, E_at), Q.where(above, Q_at))
        return carry, (scale * kap - 1.0, conf)

    eye, zeros = Mat.eye(ou.k, like), Mat.zeros(ou.k, like)
    (_, _, E_j, Q_j), (F, confs) = jax.lax.scan(grid_step, (eye, zeros, eye, zeros), None, length=grid_size + 1)
    s = jnp.clip(doublings_needed(M, dt), 0, _STEP_DOUBLINGS)

    def residual(h, a):
        M_, sw2_, var_, gram_, series, s_, scale_, E0, Q0 = a
        E_h, Q_h = double(*series(h * jnp.exp2(-s_)), s_, _STEP_DOUBLINGS)
        E, Q = step_transition(E_h, Q_h, E0, Q0)
        return scale_ * _kappa_and_confinement(M_, sw2_, var_, gram_, E, Q)[0] - 1.0

    args = (M, sw2, var, gram, SeriesCoefficients.of(M, sw2), s, scale, E_j, Q_j)
    # the in-bracket residual uses a short doubling loop: the step must be within its reach
    fine = doublings_needed(M, dt) <= _STEP_DOUBLINGS
    return _Grid(F, jnp.all(confs), jnp.all(jnp.isfinite(ou.M)), [(fine, RESULTS.grid_too_coarse)], residual, args,
                 lambda jc: (jnp.zeros((), dt.dtype), dt), lambda jc: jc * dt)


def _scheduled_grid(ou, data, t_max, scale, grid_size):
    """Time-dependent M: kappa from the dense ODE moments on the grid; the Newton unknown is t itself."""
    path = MomentPath.of(ou, t_max)
    ts = jnp.linspace(jnp.zeros((), t_max.dtype), t_max, grid_size + 1)
    kaps, confs = jax.vmap(lambda t: _kappa_td(path, ou, data, t))(ts)

    def residual(t, a):
        path_, ou_, data_, scale_ = a
        return scale_ * _kappa_td(path_, ou_, data_, t)[0] - 1.0

    return _Grid(scale * kaps - 1.0, jnp.all(confs), jnp.asarray(True), [], residual, (path, ou, data, scale),
                 lambda jc: (ts[jc], ts[jc + 1]), lambda jc: 0.0)


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
