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

import jax
import jax.numpy as jnp
from jax.scipy.linalg import expm

from .._linalg import mm, mT
from .._types import KxK
from .mixture import TwoClassMixture
from .ou import CoupledOU

# the doubling loop runs a fixed number of (masked) steps so it is reverse-differentiable
_MAX_DOUBLINGS = 24
_TARGET_NORM = 0.5


def _n_terms(dtype) -> int:
    # remainder of the series at ||2 M tau|| <= 1 is below 1/(n+1)!
    return 18 if jnp.finfo(dtype).bits == 64 else 11


def series_transition(M: KxK, sigma_w2, h, n_terms: int | None = None) -> tuple[KxK, KxK]:
    r"""$(E(h), Q(h))$ by the Taylor series of Van Loan's block exponential.

    Accurate to working precision when $\|M\|_\infty |h| \le 1/2$; the caller ensures it.
    """
    dtype = jnp.result_type(M, sigma_w2, h)
    n = _n_terms(dtype) if n_terms is None else n_terms
    k = M.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(k, dtype=dtype), M.shape)
    h = jnp.asarray(h, dtype)[..., None, None]
    Mh = M * h
    # Horner: E = I + Mh (I + Mh/2 (I + ...)); Q/h = sum_n h^n P_n/(n+1)!
    E = eye
    for j in range(n, 0, -1):
        E = eye + mm(Mh, E) / j
    P = eye
    Qs = eye
    fact = 1.0
    for j in range(1, n + 1):
        P = mm(Mh, P) + mm(P, mT(Mh))
        fact *= j + 1
        Qs = Qs + P / fact
    Q = sigma_w2 * h * Qs
    return E, 0.5 * (Q + mT(Q))


def _van_loan_block(M, sigma_w2, tau):
    k = M.shape[-1]
    eye = jnp.eye(k, dtype=M.dtype)
    H = jnp.block([[M, sigma_w2 * eye], [jnp.zeros_like(M), -M.T]])
    F = expm(H * tau)
    E = F[:k, :k]
    return E, F[:k, k:] @ E.T


def doublings_needed(M: KxK, t):
    r"""Number $s$ of semigroup doublings that bring $\|M\|_\infty |t| / 2^s$ below the series' reach (no gradient)."""
    size = jax.lax.stop_gradient(jnp.abs(t) * jnp.max(jnp.sum(jnp.abs(M), axis=-1)))
    return jnp.ceil(jnp.log2(jnp.maximum(size, 1e-30) / _TARGET_NORM))


def transition(M: KxK, sigma_w2, t, *, method: str = "series", max_doublings: int = _MAX_DOUBLINGS) -> tuple[KxK, KxK]:
    r"""$(E(t), Q(t))$ for the drift $M$ and noise variance $\sigma_W^2$ at a scalar time $t \geq 0$.

    **Arguments:**

    - `M`, `sigma_w2`, `t`: the drift matrix, noise variance and time.
    - `method`: `"series"` (default) or `"van_loan"`; see the module docstring.
    - `max_doublings`: static cap on the doublings, so $\|M\| t \le 2^{max\_doublings - 1}$
        is handled exactly (default 24); a smaller cap is cheaper for short steps.
    """
    if method not in ("series", "van_loan"):
        raise ValueError(f"`method` must be 'series' or 'van_loan', got {method!r}.")
    dtype = jnp.result_type(M, sigma_w2, t)
    M = M.astype(dtype)
    t = jnp.asarray(t, dtype)
    s = jnp.clip(doublings_needed(M, t), 0, max_doublings)
    tau = t * jnp.exp2(-s)
    if method == "series":
        E, Q = series_transition(M, sigma_w2, tau)
    else:
        E, Q = _van_loan_block(M, sigma_w2, tau)

    def double(carry, j):
        E, Q = carry
        E2, Q2 = step_transition(E, Q, E, Q)
        active = j < s
        return (jnp.where(active, E2, E), jnp.where(active, Q2, Q)), None

    (E, Q), _ = jax.lax.scan(double, (E, Q), jnp.arange(max_doublings))
    return E, Q


def step_transition(E_step, Q_step, E, Q):
    """Compose a transition (E, Q) with a later step (E_step, Q_step): the OU semigroup."""
    Q_new = Q_step + mm(mm(E_step, Q), mT(E_step))
    return mm(E_step, E), 0.5 * (Q_new + mT(Q_new))


def _moments_scalar(M, sigma_w2, variances, t):
    E, Q = transition(M, sigma_w2, t)
    S = mm(E * variances, mT(E))
    return E, Q, S, S + Q


def moments(ou: CoupledOU, data: TwoClassMixture, t):
    r"""Closed-form moments at time(s) `t`.

    **Arguments:**

    - `ou`: the forward process.
    - `data`: the two-class mixture (only its variances enter here).
    - `t`: a time $t \geq 0$, or an array of times (the outputs gain its shape in front).

    **Returns:**

    `(E, Q, S, C)`: $e^{Mt}$, $Q(t)$ (eq 9), $S(t)$ (eq 17) and $C(t) = S + Q$, each
    $k \times k$ per time.
    """
    _check_same_k(ou, data)
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
