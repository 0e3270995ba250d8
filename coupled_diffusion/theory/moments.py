r"""Closed-form moments of the coupled OU process: for any constant $k \times k$ M, and by ODE for M(t).

$E(t) = e^{Mt}$, $Q(t) = \sigma_W^2 \int_0^t e^{Ms} e^{M^\top s} ds$ (eq 9),
$S(t) = E \Sigma_0 E^\top$ (eq 17), $C(t) = S + Q$ (eq 19), $G(t) = E G_0 E^\top$ (eq 16).
For a constant M they come from Van Loan's block exponential, evaluated by its series and
exact semigroup doublings (`_semigroup.py`; no eigenbasis, so defective M such as eq (3)
is fine). For a time-dependent $M(t)$ (a coupling schedule, eq 141 and 144),
[`MomentPath`][] integrates their linear ODEs with diffrax.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import check_same_k, check_times
from .._linalg import Mat
from .._types import KxK
from ._semigroup import MAX_DOUBLINGS, covariances, transition_mat
from .mixture import TwoClassMixture
from .ou import CoupledOU


def transition(M: KxK, sigma_w2, t, *, method: str = "series", max_doublings: int = MAX_DOUBLINGS) -> tuple[KxK, KxK]:
    r"""$(E(t), Q(t))$ for the drift $M$ and noise variance $\sigma_W^2$ at a scalar time $t \geq 0$.

    **Arguments:**

    - `M`, `sigma_w2`, `t`: the drift matrix, noise variance and time.
    - `method`: `"series"` (default) or `"van_loan"` (`jax.scipy.linalg.expm` of the block matrix, a cross-check).
    - `max_doublings`: static cap on the doublings, so $\|M\| t \le 2^{max\_doublings - 1}$
        is handled exactly (default 24); a smaller cap is cheaper for short steps.
    """
    dtype = jnp.result_type(M, sigma_w2, t)
    M = jnp.asarray(M, dtype)
    t = jnp.asarray(t, dtype)
    sigma_w2 = jnp.asarray(sigma_w2, dtype)
    E, Q = transition_mat(Mat.of(M), sigma_w2, t, method=method, max_doublings=max_doublings)
    return E.array(), Q.array()


def _moments_scalar(M, sigma_w2, variances, t):
    mats = covariances(Mat.of(M), sigma_w2, [variances[i] for i in range(M.shape[-1])], t)
    return tuple(X.array() for X in mats)


def moments(ou: CoupledOU, data: TwoClassMixture, t):
    r"""Moments at time(s) `t`: closed form for a constant M, ODE solution for M(t).

    **Arguments:**

    - `ou`: the forward process.
    - `data`: the two-class mixture (only its variances enter here).
    - `t`: a time $t \geq 0$, or an array of times (the outputs gain its shape in front).

    **Returns:**

    `(E, Q, S, C)`: $e^{Mt}$, $Q(t)$ (eq 9), $S(t)$ (eq 17) and $C(t) = S + Q$, each
    $k \times k$ per time. For a time-dependent M, $E(t)$ is the propagator
    ($dE/dt = M(t) E$) and the rest follow from [`MomentPath`][].
    """
    check_same_k(ou, data)
    check_times(t)
    ou.require_stable("moments")
    if ou.time_dependent:
        t = jnp.asarray(t, jnp.result_type(ou.sigma_w2, t))
        path = MomentPath.of(ou, jnp.max(t))
        E, Q = jnp.vectorize(path, signature="()->(k,k),(k,k)")(t)
        S = E @ (data.variances[:, None] * jnp.swapaxes(E, -1, -2))
        return E, Q, S, S + Q
    fn = jnp.vectorize(
        lambda tt: _moments_scalar(ou.M, ou.sigma_w2, data.variances, tt),
        signature="()->(k,k),(k,k),(k,k),(k,k)",
    )
    return fn(jnp.asarray(t, jnp.result_type(ou.M, t)))


def mean_gram(ou: CoupledOU, data: TwoClassMixture, t):
    r"""$G(t) = e^{Mt} G_0 e^{M^\top t}$: the per-dimension Gram matrix of the drifted means (eq 7, 16)."""
    E, _, _, _ = moments(ou, data, t)
    return E @ data.gram @ jnp.swapaxes(E, -1, -2)


class MomentPath(eqx.Module):
    r"""$(E(t), Q(t))$ at any $t \in [0, t_1]$, for a constant or time-dependent M.

    For a constant M this is the closed form ([`transition`][]). For $M(t)$ the linear
    ODEs $\dot E = M E$, $\dot Q = M Q + Q M^\top + \sigma_W^2 I$ (eq 9 differentiated in $t$) are
    integrated once with diffrax (`Dopri8`, adaptive, with the schedule's declared jump
    times, e.g. the step of eq 144, as `jump_ts`) and evaluated through its dense
    7th-order interpolant. Differentiable in the schedule's parameters through
    diffrax's default `RecursiveCheckpointAdjoint` (discretise-then-optimise: exact
    gradients of the computed moments, memory logarithmic in the number of steps).

    Call it with a scalar `t`: returns `(E, Q)`, each $k \times k$.
    """

    ou: CoupledOU
    solution: diffrax.Solution | None

    @classmethod
    def of(cls, ou: CoupledOU, t1, *, rtol: float | None = None, atol: float | None = None, max_steps: int = 16384):
        if not ou.time_dependent:
            return cls(ou, None)
        k = ou.k
        dtype = jnp.result_type(ou.sigma_w2, float)
        eps = jnp.finfo(dtype).eps
        rtol = (1e-11 if eps < 1e-10 else 1e-6) if rtol is None else rtol
        atol = (1e-13 if eps < 1e-10 else 1e-7) if atol is None else atol
        eye = jnp.eye(k, dtype=dtype)

        def field(t, y, args):
            E, Q = y
            M = ou.drift_matrix(t).astype(dtype)
            MQ = M @ Q
            return M @ E, MQ + MQ.T + ou.sigma_w2 * eye

        jumps = getattr(ou.M, "jump_ts", None)
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        if jumps is not None:
            controller = diffrax.ClipStepSizeController(controller, jump_ts=jnp.atleast_1d(jnp.asarray(jumps, dtype)))
        # a hair past t1, so that t1 computed another way (e.g. exp(log t1)) is still inside
        t1 = jnp.asarray(t1, dtype) * (1 + 64 * eps)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Dopri8(),
            jnp.zeros((), dtype),
            jnp.maximum(t1, jnp.finfo(dtype).tiny),
            None,
            (eye, jnp.zeros_like(eye)),
            stepsize_controller=controller,
            saveat=diffrax.SaveAt(dense=True),
            max_steps=max_steps,
        )
        return cls(ou, sol)

    def __call__(self, t):
        if self.solution is None:
            return transition(self.ou.M, self.ou.sigma_w2, t)
        E, Q = self.solution.evaluate(t)
        return E, 0.5 * (Q + Q.T)

    def tabulate(self, ts) -> "GridMoments":
        """$(E, Q)$ at the uniform grid `ts`, computed at once (see [`GridMoments`][])."""
        ts = jnp.asarray(ts)
        E, Q = jax.vmap(self)(ts)
        return GridMoments(ts, E, Q)


class GridMoments(eqx.Module):
    r"""$(E, Q)$ tabulated on a uniform time grid, for fixed-step samplers.

    Calling it at a grid time returns the stored moments (a lookup instead of a matrix
    exponential per step); at any other time it returns NaN, never a neighbour's value,
    so a solver that evaluates between grid points cannot silently use wrong moments.
    """

    ts: jax.Array
    E: jax.Array
    Q: jax.Array

    def __call__(self, t):
        step = self.ts[1] - self.ts[0]
        i = jnp.clip(jnp.round((t - self.ts[0]) / step).astype(jnp.int32), 0, self.ts.shape[0] - 1)
        on_grid = jnp.abs(self.ts[i] - t) <= 1e-3 * jnp.abs(step)
        guard = jnp.where(on_grid, 1.0, jnp.nan).astype(self.E.dtype)
        return self.E[i] * guard, self.Q[i] * guard


def marginal_moments(path: MomentPath | GridMoments, t, variances):
    r"""$(E, Q, C)$ at a scalar `t` from a moment path, for data with per-modality `variances`:
    $C = E \Sigma_0 E^\top + Q$ (eq 19), symmetrised."""
    E, Q = path(t)
    C = E @ (variances[:, None] * E.T) + Q
    return E, Q, 0.5 * (C + C.T)
