r"""The eigenmodes of a symmetric M and their closed forms (eq 50-66, 77-78).

A symmetric M with equal data variances decouples into independent one-dimensional OU
processes along its orthonormal eigenvectors $v_i$, with rates $\lambda_i$ and per-dimension
mean norms $m_i^2 = v_i^\top G_0 v_i$. For eq (2) these are the common mode
$v_+ = (1, 1)/\sqrt2$, $\lambda_+ = -\beta + g$, and the difference mode
$v_- = (1, -1)/\sqrt2$, $\lambda_- = -\beta - g$ (eq 50-51). Each mode then has its own
signal-to-noise ratio (eq 63), speciation time (eq 66, corrected) and collapse time (eq 78);
their differences are the synchronization gap.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._checks import as_float, check_same_k, concrete, dim_scale
from .._results import RESULTS, Solution, finish, first_failure
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
        raise ValueError("The anisotropic M of eq (3) is defective: it has no eigenbasis, so no mode has a speciation or "
                         "collapse time of its own. Only the joint quantities exist for it: `kappa`, `speciation_time`, "
                         "`collapse_time` (matrix exponentials, any M).")
    if ou.structure == "symmetric":
        s = 1.0 / jnp.sqrt(jnp.asarray(2.0, ou.M.dtype))
        V = jnp.array([[s, s], [s, -s]], ou.M.dtype)
        lam = jnp.stack([-ou.beta + ou.g, -ou.beta - ou.g])
        return lam, V
    M = concrete(ou.M)
    if M is not None and not np.allclose(M, M.T):
        raise ValueError(_not_symmetric_message(np.asarray(M, np.float64)))
    lam, V = _eigh(0.5 * (ou.M + ou.M.T))
    return lam[::-1], V[:, ::-1]


@jax.custom_jvp
def _eigh(A):
    """`jnp.linalg.eigh` with a derivative that holds each degenerate eigenspace's basis fixed.

    The usual eigenvector derivative $dv_i = \sum_{j \ne i} v_j (v_j^\top dA\, v_i) / (\lambda_i - \lambda_j)$ divides by
    the rounding-level differences inside a degenerate eigenspace and returns noise there (measured: per-mode
    speciation-time gradients 0.15% off for a ring of 5). Pairs with eigenvalues equal to rounding are left out,
    which is exact when the perturbation keeps the eigenspace (e.g. $M = -\beta I + gA$ in $g$) and otherwise picks
    the fixed basis; the eigenvalues' derivatives $v_i^\top dA\, v_i$ are unchanged."""
    return jnp.linalg.eigh(A)


@_eigh.defjvp
def _eigh_jvp(primals, tangents):
    (A,), (dA,) = primals, tangents
    w, V = _eigh(A)
    P = V.T @ (0.5 * (dA + dA.T)) @ V
    diff = w[None, :] - w[:, None]  # [j, i] = w_i - w_j
    tol = 256 * jnp.finfo(w.dtype).eps * jnp.maximum(jnp.max(jnp.abs(w)), 1.0)
    apart = jnp.abs(diff) > tol
    F = jnp.where(apart, 1.0 / jnp.where(apart, diff, 1.0), 0.0)
    return (w, V), (jnp.diagonal(P), V @ (F * P))


def _not_symmetric_message(M: np.ndarray) -> str:
    """Why a non-symmetric M has no eigenmode formulas: defective (a Jordan block), complex, or non-orthogonal modes."""
    lam, V = np.linalg.eig(M)
    joint = ("Only the joint quantities exist for it: `kappa`, `speciation_time`, `collapse_time` (matrix exponentials, any M).")
    if np.linalg.cond(V) > 1e8:
        return (f"M is defective (eigenvalues {np.round(lam, 6).tolist()} share a Jordan block), so it has no eigenbasis and "
                f"no eigenmode decomposition; its Schur vectors are not invariant under the noise either. {joint} M = {M.tolist()}.")
    if np.any(np.abs(lam.imag) > 1e-12 * max(1.0, np.abs(lam).max())):
        return (f"M has complex eigenvalues {np.round(lam, 6).tolist()}: its modes rotate into each other, so no mode has a "
                f"speciation or collapse time of its own. {joint} M = {M.tolist()}.")
    return (f"M is diagonalisable but not symmetric: its eigenvectors are not orthogonal, so the isotropic noise couples the "
            f"eigenmodes and the per-mode formulas (eq 62-66, 77-78) do not hold. {joint} M = {M.tolist()}.")


def _rotate_degenerate(lam, V, gram):
    r"""Inside each degenerate eigenspace of M (eigenvalues equal to rounding) the eigenbasis is arbitrary,
    and so would be the per-mode $m_i^2 = v_i^\top G_0 v_i$: rotate it to the principal axes of the projected Gram
    $V_E^\top G_0 V_E$, which makes the modes' mean vectors orthogonal and the $m_i^2$ basis-free. Traceable: the
    projected Gram is masked to its degenerate blocks and shifted by a multiple of the eigenvalues large enough
    that different blocks' spectra cannot interleave, so one `eigh` diagonalises every block at once.
    `lam` must be in decreasing order (as [`eigenmodes`][] returns it)."""
    B = V.T @ gram @ V
    B = 0.5 * (B + B.T)
    scale = jnp.maximum(jnp.max(jnp.abs(lam)), 1.0)
    diff = jnp.abs(lam[:, None] - lam[None, :])
    same = diff <= 256 * jnp.finfo(lam.dtype).eps * scale  # equal to rounding (float32: 3e-5 relative)
    gap = jnp.min(jnp.where(same, jnp.inf, diff))
    spread = jnp.sum(jnp.abs(B)) + 1.0
    c = jnp.where(jnp.isfinite(gap), 4.0 * spread / jnp.where(jnp.isfinite(gap), gap, 1.0), 0.0)
    _, W = _eigh(jnp.where(same, B, 0.0) + c * jnp.diag(lam))
    # eigh's ascending order is by eigenvalue of M between blocks and by m_i^2 inside one: reversed, the modes run
    # slowest first and, inside a degenerate eigenspace, largest share first (a fixed order, so no mode swaps labels
    # between nearby couplings)
    V = (V @ W)[:, ::-1]
    return jnp.einsum("ij,i->j", W**2, lam)[::-1], V  # W mixes only equal eigenvalues


def mode_decomposition(ou: CoupledOU, data: TwoClassMixture):
    r"""`(lam, m2, sigma2, decomposable)`: the eigenvalues, the per-mode $m_i^2 = v_i^\top G_0 v_i$,
    the common data variance, and a traced flag that the inputs really decompose.

    Raises when M is known not to be symmetric or the variances not to be equal; under
    `jit` the flag carries that check instead (the solvers report `not_mode_decomposable`).
    Inside a degenerate eigenspace of a general symmetric M the modes are the principal axes
    of the projected Gram matrix (so that $m_i^2$ does not depend on an arbitrary basis).
    """
    lam, _, m2, sigma2, decomposable = mode_basis(ou, data)
    return lam, m2, sigma2, decomposable


def mode_basis(ou: CoupledOU, data: TwoClassMixture):
    """[`mode_decomposition`][] with the eigenvectors: `(lam, V, m2, sigma2, decomposable)`, `V` by columns."""
    check_same_k(ou, data)
    lam, V = eigenmodes(ou)
    var = concrete(data.variances)
    if var is not None and not np.allclose(var, var[0]):
        raise ValueError(
            f"The eigenmode formulas need equal data variances (sigma_x^2 = sigma_y^2), got {var.tolist()}."
        )
    sigma2 = data.variances[0]
    decomposable = jnp.all(data.variances == sigma2) & jnp.allclose(ou.M, ou.M.T)
    if ou.structure != "symmetric":  # eq (2) keeps the paper's labelled v+, v- even at g = 0
        lam, V = _rotate_degenerate(lam, V, data.gram)
    m2 = jnp.diagonal(V.T @ data.gram @ V)
    return lam, V, m2, sigma2, decomposable


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
    sol = _mode_speciation(ou, *mode_decomposition(ou, data), dim)
    return _split(sol, throw, "mode_speciation_times")


def _split(sol: Solution, throw: bool, what: str) -> tuple:
    """A `(k,)` Solution as a tuple of k scalar ones, each through the `throw=` boundary."""
    return tuple(finish(*jax.tree.map(lambda x: x[i], (sol.value, sol.result)), throw=throw, what=f"{what} (mode {i})")
                 for i in range(sol.value.shape[0]))


def _mode_speciation(ou, lam, m2, sigma2, decomposable, dim) -> Solution:
    """The closed form of [`mode_speciation_times`][] for all modes at once: a `Solution` of shape `(k,)`."""
    m2 = dim_scale(dim, lam.dtype) * m2
    sw2 = ou.sigma_w2
    stable = (lam < 0) & jnp.all(lam < 0)  # M symmetric here: its eigenvalues decide (no Routh-Hurwitz)
    lam_s = jnp.where(stable, lam, -1.0)
    B = sigma2 + sw2 / (2 * lam_s)
    a = sw2 / (2 * jnp.abs(lam_s) * (m2 + jnp.sqrt(m2**2 + B**2)))
    t = jnp.log(a) / (2 * lam_s)
    confining = sigma2 < sw2 / jnp.abs(lam_s)  # eq 59 for all t, since c(t) is monotone
    result = jax.vmap(lambda *ok: first_failure(list(zip(ok, (RESULTS.not_mode_decomposable, RESULTS.unstable, RESULTS.non_confining,
                                                              RESULTS.no_speciation))), RESULTS.successful))(
        jnp.broadcast_to(decomposable, lam.shape), stable, confining, (m2 > 0) & (a < 1))
    return finish(t, result, throw=False, what="")


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
    sol = _mode_collapse(ou, lam, sigma2, decomposable, alpha)
    return _split(sol, throw, "mode_collapse_times")


def _mode_collapse(ou, lam, sigma2, decomposable, alpha) -> Solution:
    """The closed form of [`mode_collapse_times`][] for all modes at once: a `Solution` of shape `(k,)`."""
    alpha = as_float(alpha, "alpha").astype(lam.dtype)
    tau = -2 * lam
    stable = (tau > 0) & jnp.all(tau > 0)
    tau_s = jnp.where(stable, tau, 1.0)
    t = jnp.log1p(sigma2 / ou.sigma_w2 * tau_s / jnp.expm1(2 * alpha)) / tau_s
    result = jax.vmap(lambda *ok: first_failure(list(zip(ok, (RESULTS.not_mode_decomposable, RESULTS.unstable, RESULTS.no_collapse))),
                                                RESULTS.successful))(
        jnp.broadcast_to(decomposable, lam.shape), stable, jnp.broadcast_to(alpha > 0, lam.shape))
    return finish(t, result, throw=False, what="")


class ModeHierarchy(eqx.Module):
    r"""The eigenmodes of a symmetric M ordered by when they commit, from [`mode_hierarchy`][].

    **Attributes** (k modes in decreasing-eigenvalue order, slowest first):

    - `eigenvalues` `(k,)`, `eigenvectors` `(k, k)` (columns), `m2` `(k,)` the per-mode $m_i^2$.
    - `speciation` `(k,)`: a [`Solution`][] of each mode's speciation time (eq 65-66), NaN where it has none.
    - `collapse` `(k,)`: a [`Solution`][] of each mode's collapse time (eq 77-78), or None without `alpha`.

    **Properties:** `order` (mode indices by decreasing speciation time: the reverse process meets the first
    one first; modes without one last), `n_committed`, `times` (the speciation times in that order, NaN-padded),
    `gaps` `(k - 1,)` (successive differences of `times`, positive), `spread` (first minus last speciation
    time among the committing modes; 0 for one, NaN for none), `spectral_gap` ($\lambda_1 - \lambda_2$),
    `spectral_width` ($\lambda_1 - \lambda_k$).
    """

    eigenvalues: Array
    eigenvectors: Array
    m2: Array
    speciation: Solution
    collapse: Solution | None

    @property
    def order(self):
        t = jnp.where(self.speciation.found, self.speciation.value, -jnp.inf)
        return jnp.argsort(-t, stable=True)

    @property
    def n_committed(self):
        return jnp.sum(self.speciation.found)

    @property
    def times(self):
        return self.speciation.value[self.order]

    @property
    def gaps(self):
        return -jnp.diff(self.times)

    @property
    def spread(self):
        t = self.times
        last = t[jnp.maximum(self.n_committed - 1, 0)]
        return jnp.where(self.n_committed > 0, t[0] - last, jnp.nan)

    @property
    def spectral_gap(self):
        return self.eigenvalues[0] - self.eigenvalues[1]

    @property
    def spectral_width(self):
        return self.eigenvalues[0] - self.eigenvalues[-1]


def mode_hierarchy(ou: CoupledOU, data: TwoClassMixture, *, dim=None, alpha=None) -> ModeHierarchy:
    r"""Per-eigenmode speciation (and, with `alpha`, collapse) times of any symmetric M with k modalities, and the
    order in which the modes commit: the closed forms of eq (65-66) and (77-78) mode by mode, generalised from
    $k = 2$. Each mode $v_i$ relaxes at its own rate $\lambda_i$ and carries $m_i^2 = v_i^\top G_0 v_i$ of the class
    separation; inside a degenerate eigenspace the modes are the principal axes of the projected Gram matrix.
    Pure `jnp`: `vmap` it over couplings (see `cd.coupling_matrix`), `jit` it, differentiate the times.

    A non-symmetric M raises (a concrete one with the reason: defective, complex or non-orthogonal modes; only
    the joint `speciation_time` / `collapse_time` exist for it); under `jit` the times carry
    `not_mode_decomposable` instead. `dim`: as in [`mode_speciation_times`][]; `alpha`: as in [`mode_collapse_times`][].
    """
    lam, V, m2, sigma2, decomposable = mode_basis(ou, data)
    spec = _mode_speciation(ou, lam, m2, sigma2, decomposable, dim)
    coll = None if alpha is None else _mode_collapse(ou, lam, sigma2, decomposable, alpha)
    return ModeHierarchy(lam, V, m2, spec, coll)
