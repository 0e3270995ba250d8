r"""The OU semigroup on entry-list matrices: the solvers' fast path for a constant M.

$E(t) = e^{Mt}$ and $Q(t) = \sigma_W^2 \int_0^t e^{Ms} e^{M^\top s} ds$ (eq 9) from Van Loan's
block exponential $\exp\begin{pmatrix} M & \sigma_W^2 I \\ 0 & -M^\top \end{pmatrix}\tau$, for any
real M (defective ones included: no eigenbasis is used), evaluated in one of two ways at a
scaled-down time $\tau = t/2^s$ with $\|M\|_\infty\tau \le 1/2$:

- `"series"` (default): its Taylor series written out, $E(\tau) = \sum_n (M\tau)^n/n!$ and
  $Q(\tau) = \sigma_W^2 \sum_n \tau^{n+1} P_n/(n+1)!$ with $P_0 = I$,
  $P_{n+1} = M P_n + P_n M^\top$, truncated where the remainder is below the working
  precision ([`SeriesCoefficients`][]). It needs only $k \times k$ products, which is several
  times faster than a $2k \times 2k$ exponential under `vmap`.
- `"van_loan"`: the block exponential by `jax.scipy.linalg.expm`; an independent cross-check.

Then $s$ exact doublings of the semigroup, $E(2\tau) = E(\tau)^2$,
$Q(2\tau) = Q(\tau) + E(\tau) Q(\tau) E(\tau)^\top$ ([`double`][]): only positive
semi-definite terms are added, so large $t$ loses nothing. [`step_transition`][] composes a
transition with a later step, which is how the speciation solver walks its grid.

Everything here acts on [`Mat`][]s (one array per matrix entry, see `_linalg.py`); the
user-facing forms are [`transition`][] and [`moments`][] in `moments.py`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import expm

from .._linalg import DenseMat, Mat

# the doubling loop runs a fixed number of (masked) steps so it is reverse-differentiable
MAX_DOUBLINGS = 24
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
    norm = jnp.max(jnp.sum(jnp.abs(M.array()), -1), -1)
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
    M: Mat, sigma_w2, t, *, method: str = "series", max_doublings: int = MAX_DOUBLINGS, series: SeriesCoefficients | None = None
) -> tuple[Mat, Mat]:
    """$(E(t), Q(t))$ as [`Mat`][]s at a scalar time $t \geq 0$ (the batched fast path used by the solvers).

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



def covariances(M: Mat, sigma_w2, variances, t, series: SeriesCoefficients | None = None) -> tuple[Mat, Mat, Mat, Mat]:
    """`(E, Q, S, C)` at a scalar time as [`Mat`][]s (`variances`: a sequence of k scalars)."""
    E, Q = transition_mat(M, sigma_w2, t, series=series)
    S = scaled_gram(E, variances)
    return E, Q, S, S + Q


def scaled_gram(E: Mat, variances) -> Mat:
    r"""$E \operatorname{diag}(v) E^\top$."""
    k = E.k
    if isinstance(E, DenseMat):
        v = jnp.stack(jnp.broadcast_arrays(*variances), -1)
        return DenseMat(E.a @ (v[..., :, None] * jnp.swapaxes(E.a, -1, -2))).sym()
    out = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            out[i][j] = out[j][i] = sum(E[i, l] * variances[l] * E[j, l] for l in range(k))
    return Mat(out)


def step_transition(E_step: Mat, Q_step: Mat, E: Mat, Q: Mat) -> tuple[Mat, Mat]:
    """Compose a transition (E, Q) with a later step (E_step, Q_step): the OU semigroup."""
    return E_step @ E, (Q_step + E_step @ Q @ E_step.T).sym()
