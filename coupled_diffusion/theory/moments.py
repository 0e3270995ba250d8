r"""Closed-form moments of the coupled OU process for any constant $k \times k$ M.

$E(t) = e^{Mt}$, $Q(t) = \sigma_W^2 \int_0^t e^{Ms} e^{M^\top s} ds$ (eq 9),
$S(t) = E \Sigma_0 E^\top$ (eq 17), $C(t) = S + Q$ (eq 19), $G(t) = E G_0 E^\top$.

Two evaluations of the same closed form are offered, both valid for defective M
(no eigenbasis is used):

- `"series"` (default): Van Loan's block exponential
  $\exp\begin{pmatrix} M & \sigma_W^2 I \\ 0 & -M^\top \end{pmatrix}\tau$ written out
  through its Taylor series at a scaled-down time $\tau = t/2^s$ with
  $\|M\|\tau \le 1/2$: $E(\tau) = \sum_n (M\tau)^n/n!$ and
  $Q(\tau) = \sigma_W^2 \sum_n \tau^{n+1} P_n/(n+1)!$ with $P_0 = I$,
  $P_{n+1} = M P_n + P_n M^\top$, truncated where the remainder is below the working
  precision. Then $s$ exact doublings of the semigroup,
  $E(2\tau) = E(\tau)^2$, $Q(2\tau) = Q(\tau) + E(\tau) Q(\tau) E(\tau)^\top$ (only
  positive semi-definite terms are added, so large $t$ loses nothing). It needs only
  $k \times k$ products, which is several times faster than a $2k \times 2k$ exponential
  under `vmap`.
- `"van_loan"`: the same block exponential by `jax.scipy.linalg.expm` at the scaled
  time, then the same doublings; kept as an independent cross-check.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import expm

from .._linalg import Mat
from .._types import KxK
from .mixture import TwoClassMixture
from .ou import CoupledOU

# the doubling loop runs a fixed number of (masked) steps so it is reverse-differentiable
_MAX_DOUBLINGS = 24
_TARGET_NORM = 0.5


def _n_terms(dtype) -> int:
    # remainder of the series at ||2 M tau|| <= 1 is below 1/(n+1)!
    return 18 if jnp.finfo(dtype).bits == 64 else 11


class SeriesCoefficients(eqx.Module):
    r"""Matrix coefficients of $E(\tau) = \sum_n \tau^n A_n$ and $Q(\tau) = \sum_n \tau^{n+1} B_n$.

    $A_n = M^n / n!$ and $B_n = \sigma_W^2 P_n / (n+1)!$ with $P_0 = I$,
    $P_n = M P_{n-1} + P_{n-1} M^\top$: the Taylor series of Van Loan's block exponential.
    They depend on $M$ only, so a root-finder that evaluates the transition at many
    $\tau$ computes them once; each evaluation is then a scalar Horner recursion.
    Leaves are stacked along a leading axis of length `n_terms + 1`.
    """

    A: Mat
    B: Mat

    @classmethod
    def of(cls, M: Mat, sigma_w2, n_terms: int | None = None) -> "SeriesCoefficients":
        dtype = jnp.result_type(M[0, 0], sigma_w2)
        n = _n_terms(dtype) if n_terms is None else n_terms
        j = np.arange(1, n + 1, dtype=np.float64)
        eye = Mat.eye(M.k, jnp.zeros_like(M[0, 0] + sigma_w2))

        # a rolled loop keeps the traced program small, which matters for compile time
        # once this is nested in solvers and their adjoints
        def term(carry, coeffs):
            A, P = carry
            inv_j, inv_fact = coeffs
            A = (A @ M) * inv_j
            X = M @ P
            P = X + X.T  # exactly symmetric
            return (A, P), (A, P * (sigma_w2 * inv_fact))

        _, (A, B) = jax.lax.scan(term, (eye, eye), (jnp.asarray(1.0 / j, dtype), jnp.asarray(1.0 / np.cumprod(j + 1), dtype)))
        stack = lambda X0, Xs: jax.tree.map(lambda x0, xs: jnp.concatenate([x0[None], xs]), X0, Xs)
        return cls(stack(eye, A), stack(eye * sigma_w2, B))

    def __call__(self, tau) -> tuple[Mat, Mat]:
        r"""$(E(\tau), Q(\tau))$; accurate to working precision for $\|M\|_\infty |\tau| \le 1/2$."""
        n = jax.tree.leaves(self.A)[0].shape[0]
        term = lambda X, i: jax.tree.map(lambda x: x[i], X)
        E, Q = term(self.A, n - 1), term(self.B, n - 1)
        for i in range(n - 2, -1, -1):
            E = term(self.A, i) + E * tau
            Q = term(self.B, i) + Q * tau
        return E, Q * tau


def series_transition(M: Mat, sigma_w2, h, n_terms: int | None = None) -> tuple[Mat, Mat]:
    r"""$(E(h), Q(h))$ by the Taylor series of Van Loan's block exponential, as [`Mat`][]s.

    Accurate to working precision when $\|M\|_\infty |h| \le 1/2$; the caller ensures it.
    """
    return SeriesCoefficients.of(M, sigma_w2, n_terms)(h)


def _van_loan_block(M: Mat, sigma_w2, tau) -> tuple[Mat, Mat]:
    A = M.array()
    k = A.shape[-1]
    eye = jnp.eye(k, dtype=A.dtype)
    H = jnp.block([[A, sigma_w2 * eye], [jnp.zeros_like(A), -A.T]])
    F = expm(H * tau)
    E = F[:k, :k]
    return Mat.of(E), Mat.of(F[:k, k:] @ E.T).sym()


def doublings_needed(M: Mat, t):
    r"""Number $s$ of semigroup doublings that bring $\|M\|_\infty |t| / 2^s$ below the series' reach (no gradient)."""
    row_sums = [sum(jnp.abs(a) for a in r) for r in M.rows]
    norm = row_sums[0]
    for r in row_sums[1:]:
        norm = jnp.maximum(norm, r)
    size = jax.lax.stop_gradient(jnp.abs(t) * norm)
    return jnp.ceil(jnp.log2(jnp.maximum(size, 1e-30) / _TARGET_NORM))


def double(E: Mat, Q: Mat, s, max_doublings: int) -> tuple[Mat, Mat]:
    r"""$s$ exact semigroup doublings $(E, Q)(\tau) \to (E, Q)(2^s \tau)$, $s \le$ `max_doublings` (static)."""

    def step(carry, j):
        E, Q = carry
        E2, Q2 = step_transition(E, Q, E, Q)
        active = j < s
        return (E2.where(active, E), Q2.where(active, Q)), None

    if max_doublings > 0:
        (E, Q), _ = jax.lax.scan(step, (E, Q), jnp.arange(max_doublings))
    return E, Q


def transition_mat(
    M: Mat, sigma_w2, t, *, method: str = "series", max_doublings: int = _MAX_DOUBLINGS, series: SeriesCoefficients | None = None
) -> tuple[Mat, Mat]:
    """[`transition`][] on a [`Mat`][] (the batched fast path used by the solvers).

    `series`: precomputed [`SeriesCoefficients`][] of `(M, sigma_w2)`, for many `t`.
    """
    if method not in ("series", "van_loan"):
        raise ValueError(f"`method` must be 'series' or 'van_loan', got {method!r}.")
    s = jnp.clip(doublings_needed(M, t), 0, max_doublings)
    tau = t * jnp.exp2(-s)
    if method == "series":
        E, Q = (SeriesCoefficients.of(M, sigma_w2) if series is None else series)(tau)
    else:
        E, Q = _van_loan_block(M, sigma_w2, tau)
    return double(E, Q, s, max_doublings)


def transition(M: KxK, sigma_w2, t, *, method: str = "series", max_doublings: int = _MAX_DOUBLINGS) -> tuple[KxK, KxK]:
    r"""$(E(t), Q(t))$ for the drift $M$ and noise variance $\sigma_W^2$ at a scalar time $t \geq 0$.

    **Arguments:**

    - `M`, `sigma_w2`, `t`: the drift matrix, noise variance and time.
    - `method`: `"series"` (default) or `"van_loan"`; see the module docstring.
    - `max_doublings`: static cap on the doublings, so $\|M\| t \le 2^{max\_doublings - 1}$
        is handled exactly (default 24); a smaller cap is cheaper for short steps.
    """
    dtype = jnp.result_type(M, sigma_w2, t)
    M = jnp.asarray(M, dtype)
    t = jnp.asarray(t, dtype)
    sigma_w2 = jnp.asarray(sigma_w2, dtype)
    E, Q = transition_mat(Mat.of(M), sigma_w2, t, method=method, max_doublings=max_doublings)
    return E.array(), Q.array()


def step_transition(E_step: Mat, Q_step: Mat, E: Mat, Q: Mat) -> tuple[Mat, Mat]:
    """Compose a transition (E, Q) with a later step (E_step, Q_step): the OU semigroup."""
    return E_step @ E, (Q_step + E_step @ Q @ E_step.T).sym()


def covariances(M: Mat, sigma_w2, variances, t, series: SeriesCoefficients | None = None) -> tuple[Mat, Mat, Mat, Mat]:
    """`(E, Q, S, C)` at a scalar time as [`Mat`][]s (`variances`: a sequence of k scalars)."""
    E, Q = transition_mat(M, sigma_w2, t, series=series)
    S = scaled_gram(E, variances)
    return E, Q, S, S + Q


def scaled_gram(E: Mat, variances) -> Mat:
    r"""$E \operatorname{diag}(v) E^\top$."""
    k = E.k
    out = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            out[i][j] = out[j][i] = sum(E[i, l] * variances[l] * E[j, l] for l in range(k))
    return Mat(out)


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
    _check_same_k(ou, data)
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


def _check_same_k(ou: CoupledOU, data: TwoClassMixture) -> None:
    if ou.k != data.k:
        raise ValueError(
            f"`ou` has k={ou.k} modalities but `data` has k={data.k}: the Gram matrix and "
            f"variances must be {ou.k} x {ou.k} and ({ou.k},)."
        )


class MomentPath(eqx.Module):
    r"""$(E(t), Q(t))$ at any $t \in [0, t_1]$, for a constant or time-dependent M.

    For a constant M this is the closed form ([`transition`][]). For $M(t)$ the linear
    ODEs $\dot E = M E$, $\dot Q = M Q + Q M^\top + \sigma_W^2 I$ (SCIENCE.md) are
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
