r"""Criticality of the reverse process on periodic images (issue 19): softening Fourier modes, the critical
time, correlation lengths and a Ginzburg-Landau reading.

**Mode growth rates.** The reverse SDE runs in reverse time $s = T - t$ with drift
$f_t(z) = -M(t) z + \sigma_W^2 \nabla \log p_t(z)$ (`sde.py`). Linearised about a state $\bar z$,
$\delta\dot z = J_t\, \delta z$ with $J_t = \partial f_t / \partial z\,(\bar z)$. For a
translation-equivariant score and a state constant across pixels, $J_t$ is a convolution, so each
Fourier mode $q$ evolves on its own with the $k \times k$ symbol

$$G_t(q) = -M(t) + \sigma_W^2 \hat K_t(q), \qquad \hat K_t(q) = \sum_\delta K_t(\delta)\, e^{i q\cdot\delta},$$

where $K_t(\delta) = \partial s_x / \partial z_{x+\delta}$ is the score's Jacobian kernel. The growth
rates of mode $q$ are the real parts of the eigenvalues of $G_t(q)$ (descending). A mode grows in
reverse time where its rate is positive: the fluctuations it carries are amplified instead of being
pulled back to the mean. Two ways to get them:

- `method="exact"`: for patch models ([`GaussianPatchScore`][], equivariant [`PatchScore`][]), the
  kernel is the Jacobian of the centre-pixel score of one patch at the constant patch $\bar z$
  (`jax.jacfwd`, $kP^n$ tangents), Fourier transformed: every mode at once, exact to rounding.
- `method="jvp"`: for any drift (a trained network too), Jacobian-vector products with Fourier probes
  $e_b\,e^{iq\cdot x}$ (real cos/sin pairs, `jax.linearize` once, probes batched with `lax.map`):
  $G_{ab}(q) = d^{-1}\sum_x e^{-iq\cdot x}\,[J(e_b e^{iq\cdot})]_a(x)$. For an equivariant score at a
  constant state this is the exact symbol; otherwise (a network at the mean digit) it is the
  diagonal of $J$ in the Fourier basis: the rate of the mode "on average over the image".

**The critical time.** $t_c$ is the largest $t$ at which the top rate $\max_q$ crosses zero: the first
instability met by the reverse process running from $T$ down to 0, the same convention (and the same
grid + bracketed Newton pipeline, `theory/_roots.py`) as the speciation time. For the two-cluster
model with $P = L$ it *is* the speciation time of the unscaled criterion $d\,\kappa = 1$: the drift's
Jacobian at the origin, $-(M + \sigma_W^2 C^{-1}) + \sigma_W^2 C^{-1}\mu\mu^\top C^{-1}$, is singular
exactly when $\sigma_W^2 \mu^\top C^{-1}(M + \sigma_W^2 C^{-1})^{-1} C^{-1}\mu = 1$ (tested).

**Correlation length.** For fields $\phi$ (samples of $z_t$, or of $\hat x_0$), the structure factor of
the fluctuations about the sample mean, $S(q) = \langle |\widehat{\delta\phi}(q)|^2 \rangle / d$, and the
second-moment correlation length of lattice field theory,
$\xi^2 = \big(S(0)/S(q_1) - 1\big) / \big(4 \sin^2(\pi/L)\big)$, $q_1 = 2\pi/L$ along each axis,
with a jackknife error over samples. It is exact for the lattice Ornstein-Zernike spectrum
$S(q) \propto 1/(\xi^{-2} + \hat q^2)$, $\hat q^2 = \sum_i 4 \sin^2(q_i/2)$.

**Ginzburg-Landau.** Near $t_c$ the top rates at small $q$ are fitted to
$\lambda_t(q) = -(r(t) + c(t)\,\hat q^2)$ (the linear relaxation of $F = \int r\phi^2 + c|\nabla\phi|^2$),
giving the mass $r$, the stiffness $c$, and the predicted $\xi = \sqrt{c / |r|}$.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import as_float, concrete
from .._results import RESULTS, Solution, finish
from ..theory import _roots
from ..theory.ou import CoupledOU

__all__ = [
    "CorrelationLength",
    "GinzburgLandauFit",
    "ModeRates",
    "correlation_function",
    "correlation_length",
    "critical_time",
    "fourier_modes",
    "ginzburg_landau_fit",
    "mode_growth_rates",
    "reverse_drift",
    "structure_factor",
]


def fourier_modes(side: int, ndim: int) -> np.ndarray:
    """The integer wavenumbers $n$ ($q = 2\\pi n / L$) of a periodic image of side `side` in `ndim` (1 or 2)
    dimensions, in NumPy's FFT order (row-major in 2-D): an `(side**ndim, ndim)` array."""
    f = np.rint(np.fft.fftfreq(side) * side).astype(int)
    if ndim == 1:
        return f[:, None]
    if ndim == 2:
        return np.stack(np.meshgrid(f, f, indexing="ij"), -1).reshape(-1, 2)
    raise ValueError(f"`ndim` must be 1 or 2, got {ndim!r}.")


def _qhat2(wavenumbers, side):
    """The lattice Laplacian's symbol $\\hat q^2 = \\sum_i 4 \\sin^2(q_i / 2)$."""
    return jnp.sum(4 * jnp.sin(jnp.pi * jnp.asarray(wavenumbers) / side) ** 2, -1)


class ModeRates(eqx.Module):
    """Fourier growth rates of the linearised reverse drift.

    **Attributes:**

    - `wavenumbers`: `(n_q, ndim)` integers $n$, $q = 2\\pi n / L$.
    - `matrix`: the drift's symbol $G_t(q)$, `(..., n_q, k, k)` complex (leading axes: the times asked).
    - `rates`: the real parts of its eigenvalues, `(..., n_q, k)`, descending along the last axis.
    - `side`: the image side $L$.
    """

    wavenumbers: jax.Array
    matrix: jax.Array
    rates: jax.Array
    side: int = eqx.field(static=True)

    @property
    def q(self):
        """$|q| = 2\\pi |n| / L$, `(n_q,)`."""
        return 2 * jnp.pi * jnp.linalg.norm(self.wavenumbers.astype(self.rates.dtype), axis=-1) / self.side

    @property
    def qhat2(self):
        """The lattice $\\hat q^2 = \\sum_i 4\\sin^2(q_i/2)$, `(n_q,)` (the Laplacian's symbol)."""
        return _qhat2(self.wavenumbers, self.side).astype(self.rates.dtype)

    @property
    def top(self):
        """The largest rate over modes and branches, `(...)`: the first mode to go unstable."""
        return jnp.max(self.rates[..., 0], axis=-1)

    @property
    def top_mode(self):
        """The index (into `wavenumbers`) of the fastest-growing mode, `(...)`."""
        return jnp.argmax(self.rates[..., 0], axis=-1)

    def shells(self):
        """Rates averaged over shells of equal $|n|^2$: `(n2, rates)`, `n2` the distinct $|n|^2$ ascending
        (concrete), `rates` of shape `(..., n_shells, k)`."""
        n2 = np.sum(np.asarray(self.wavenumbers) ** 2, -1)
        values = np.unique(n2)
        member = jnp.asarray(n2[None, :] == values[:, None], self.rates.dtype)  # (shells, n_q)
        return values, jnp.einsum("sq,...qk->...sk", member, self.rates) / member.sum(1)[:, None]


def reverse_drift(ou: CoupledOU, score) -> Callable:
    r"""The reverse SDE's drift $f(t, z) = -M(t) z + \sigma_W^2\, s(t, z)$ in reverse time (eq 10)."""

    def drift(t, z):
        M = ou.drift_matrix(t).astype(z.dtype)
        return -jnp.einsum("ab,...bd->...ad", M, z) + ou.sigma_w2 * score(t, z)

    return drift


def _sorted_real_eigenvalues(G):
    """Real parts of the eigenvalues of `(..., k, k)` complex matrices, descending: closed forms for k <= 2
    (differentiable, any backend), `eigvals` beyond."""
    k = G.shape[-1]
    if k == 1:
        return jnp.real(G[..., 0, :])
    if k == 2:
        half_tr = 0.5 * (G[..., 0, 0] + G[..., 1, 1])
        det = G[..., 0, 0] * G[..., 1, 1] - G[..., 0, 1] * G[..., 1, 0]
        root = jnp.sqrt(half_tr**2 - det + 0j)
        pair = jnp.real(jnp.stack([half_tr + root, half_tr - root], -1))
        return jnp.sort(pair, -1)[..., ::-1]
    return jnp.sort(jnp.real(jnp.linalg.eigvals(G)), -1)[..., ::-1]


def _exact_symbol(ou, score, t):
    """$G_t(q)$ for every mode of a patch model, from the centre-pixel Jacobian kernel."""
    k = ou.k
    zbar = score.mean_state(t)
    n_pix = score.index.shape[1]
    u0 = jnp.broadcast_to(zbar[:, None], (k, n_pix))
    K = jax.jacfwd(lambda u: score.centre_score(t, u))(u0)  # (k, k, P**ndim)
    img = jnp.zeros((k, k, score.dim), K.dtype).at[:, :, score.index[0]].add(K)
    img = img.reshape((k, k) + (score.side,) * score.ndim)
    axes = tuple(range(2, 2 + score.ndim))
    Khat = (score.dim * jnp.fft.ifftn(img, axes=axes)).reshape(k, k, -1)  # sum_delta K(delta) e^{i q delta}
    M = ou.drift_matrix(t).astype(K.dtype)
    return -M[None] + ou.sigma_w2 * jnp.moveaxis(Khat, -1, 0)  # (n_q, k, k)


def _jvp_symbol(f, z, wavenumbers, side, ndim, batch, reverse=False):
    """$G_{ab}(q) = d^{-1} \\sum_x e^{-iqx} [J(e_b e^{iq\\cdot})]_a(x)$ by batched Jacobian-vector products (or, with
    `reverse`, vector-Jacobian products: for models whose operations only define a VJP)."""
    k, d = z.shape
    pos = np.stack(np.unravel_index(np.arange(d), (side,) * ndim), -1)  # pixel coordinates, row-major
    phase = jnp.asarray(2 * np.pi / side * pos @ np.asarray(wavenumbers).T, z.dtype)  # (d, n_q)
    n_q = phase.shape[1]
    waves = jnp.stack([jnp.cos(phase.T), jnp.sin(phase.T)], 1)  # (n_q, 2, d)
    eye = jnp.eye(k, dtype=z.dtype)
    probes = waves[:, :, None, None, :] * eye[None, None, :, :, None]  # (n_q, 2, b, k, d)
    if reverse:  # G_ab(q) = d^-1 sum_x conj([J^T(e_a e^{iq.})]_b(x)) e^{iqx}: vector-Jacobian products
        _, pullback = jax.vjp(f, z)
        out = jax.lax.map(lambda v: pullback(v)[0], probes.reshape(-1, k, d), batch_size=batch).reshape(n_q, 2, k, k, d)
        JTphi = out[:, 0] + 1j * out[:, 1]  # (n_q, a, b, d)
        return jnp.einsum("xq,qabx->qab", jnp.exp(1j * phase), jnp.conj(JTphi)) / d
    _, lin = jax.linearize(f, z)
    out = jax.lax.map(lin, probes.reshape(-1, k, d), batch_size=batch).reshape(n_q, 2, k, k, d)
    Jphi = out[:, 0] + 1j * out[:, 1]  # (n_q, b, a, d)
    return jnp.einsum("xq,qbax->qab", jnp.exp(-1j * phase), Jphi) / d


def mode_growth_rates(ou: CoupledOU, score, t, *, method: str = "auto", z=None, modes=None, side=None, ndim=None,
                      batch: int | None = 256) -> ModeRates:
    r"""The Fourier growth rates of the reverse drift linearised about a state (module docstring).

    **Arguments:**

    - `ou`: the forward process ($M(t)$, $\sigma_W^2$).
    - `score`: any score `score(t, z)` on states `(..., k, d)`; the patch models carry their geometry.
    - `t`: forward time(s) $> 0$; a 1-D array gives rates at each.
    - `method`: `"exact"` (patch models: the Jacobian kernel, all modes), `"jvp"` (any score), `"vjp"`
        (the same symbol by reverse mode, for models built on `custom_vjp` operations such as the
        oneDNN convolutions of the CPU U-Net), or `"auto"` (exact where possible).
    - `z`: the linearisation state `(k, d)` for `"jvp"`; default the patch model's mean state
        $E(t)\bar m$ (constant across pixels). A network needs it (e.g. $E(t)$ times the data mean). A
        batch `(n, k, d)` (e.g. samples of $z_t$) gives the symbol averaged over those states: the rates
        of the *mean* Jacobian $\langle J_t(z) \rangle$, where the nonlinearity of the score matters.
    - `modes`: for `"jvp"`, the wavenumbers `(n_q, ndim)` to probe (default all $d$).
    - `side`, `ndim`: the image geometry, for a score that does not carry it.
    - `batch`: probes per vectorised call of the `"jvp"` method (memory `batch` x one drift evaluation).
    """
    side = getattr(score, "side", side)
    ndim = getattr(score, "ndim", ndim)
    if side is None or ndim not in (1, 2):
        raise ValueError("`side` and `ndim` (1 or 2) are needed for a score that does not carry its image geometry.")
    patchy = hasattr(score, "centre_score") and getattr(score, "equivariant", True)
    if method == "auto":
        method = "exact" if patchy else "jvp"
    if method not in ("exact", "jvp", "vjp"):
        raise ValueError(f"`method` must be 'exact', 'jvp', 'vjp' or 'auto', got {method!r}.")
    if method == "exact" and not patchy:
        raise ValueError("`method='exact'` needs an equivariant patch model (GaussianPatchScore or PatchScore(equivariant=True)); "
                         "use `method='jvp'` for any other score.")
    if modes is not None and method == "exact":
        raise ValueError("`modes` selects probes of the 'jvp'/'vjp' methods; the exact method gives every mode.")
    all_modes = fourier_modes(int(side), int(ndim))
    wavenumbers = all_modes if modes is None else np.asarray(modes, int).reshape(-1, ndim)
    t = as_float(t, "t")
    tv = concrete(t)
    if tv is not None and not (np.all(np.isfinite(tv)) and np.all(tv > 0)):
        raise ValueError(f"`t` must be finite forward times > 0 (the score is singular at t = 0), got {tv}.")
    if t.ndim > 1:
        raise ValueError(f"`t` must be a scalar or a 1-D array of times, got shape {t.shape}.")
    d = int(side) ** int(ndim)
    if method == "exact":
        G = jax.vmap(lambda tt: _exact_symbol(ou, score, tt))(jnp.atleast_1d(t))
    else:
        if z is None and not hasattr(score, "mean_state"):
            raise ValueError("`z` (the linearisation state, shape (k, d)) is needed for a score without a mean state.")
        if z is not None:
            z = jnp.asarray(z)
            if z.shape[-2:] != (ou.k, d) or z.ndim not in (2, 3):
                raise ValueError(f"`z` must be a state (k, d) = ({ou.k}, {d}) or a batch of them (n, k, d), got {z.shape}.")
        drift = reverse_drift(ou, score)

        def one(tt):
            zz = z if z is not None else jnp.broadcast_to(score.mean_state(tt)[:, None], (ou.k, d))
            sym = lambda v: _jvp_symbol(lambda w: drift(tt, w), v.astype(tt.dtype), wavenumbers, int(side), int(ndim), batch,  # noqa: E731
                                        reverse=method == "vjp")
            if zz.ndim == 2:
                return sym(zz)
            return jax.lax.map(sym, zz).mean(0)  # the symbol averaged over the states

        G = jax.lax.map(one, jnp.atleast_1d(t))
    if t.ndim == 0:
        G = G[0]
    return ModeRates(jnp.asarray(wavenumbers), G, _sorted_real_eigenvalues(G), int(side))


def critical_time(fn: Callable, args=None, *, t_min, t_max, grid_size: int = 64, rtol: float | None = None,
                  atol: float | None = None, max_steps: int = 32, throw: bool = True) -> Solution:
    r"""The critical time: the largest $t \in [t_{min}, t_{max}]$ where `fn(t, args)` (a growth rate,
    e.g. `mode_growth_rates(ou, score, t).top`) crosses zero from above as $t$ grows.

    `fn` is evaluated on a uniform grid of `grid_size` steps; the last grid point where it is $\geq 0$
    brackets the root, which a bracketed Newton solve (optimistix) refines. The root is differentiable
    in `args` (implicit function theorem) and the whole solve is `jit`/`vmap`-able; the grid itself
    carries no gradient. `t_min > 0` keeps the grid off $t = 0$, where scores are singular.

    **Returns:** a [`Solution`][]: `value` $t_c$, `result`: `no_critical_point` (the rate is negative on the
    whole grid), `critical_beyond_t_max` (still $\geq 0$ at $t_{max}$), `nonfinite_rate`. `throw=True`
    (default) raises on failure; `False` returns NaN and the code.
    """
    dtype = jnp.result_type(float)
    t_min, t_max = as_float(t_min, "t_min").astype(dtype), as_float(t_max, "t_max").astype(dtype)
    a, b = concrete(t_min), concrete(t_max)
    if a is not None and b is not None and not (a.ndim == 0 and b.ndim == 0 and 0 < a < b and np.isfinite(b)):
        raise ValueError(f"`t_min` and `t_max` must be finite scalars with 0 < t_min < t_max, got {a} and {b}.")
    options = _roots.Options.of(dtype, grid_size=grid_size, rtol=rtol, atol=atol, max_steps=max_steps)
    value, result = _critical_core(fn, args, t_min, t_max, options=options)
    return finish(value, result, throw=throw, what="critical_time")


@eqx.filter_jit
def _critical_core(fn, args, t_min, t_max, *, options):
    ts = jnp.linspace(t_min, t_max, options.grid_size + 1)
    F = jax.lax.map(lambda tt: jnp.asarray(fn(tt, args), ts.dtype), ts)
    finite = jnp.all(jnp.isfinite(F))
    value, _, result = _roots.solve_last_crossing(
        lambda tt, a: fn(tt, a).astype(ts.dtype), args, jnp.where(finite, F, -1.0), lambda jc: (ts[jc], ts[jc + 1]),
        [(finite, RESULTS.nonfinite_rate)], no_crossing=RESULTS.no_critical_point,
        crossing_at_end=RESULTS.critical_beyond_t_max, options=options,
    )
    return value, result


def _fields(fields, ndim):
    fields = jnp.asarray(fields)
    if ndim not in (1, 2):
        raise ValueError(f"`ndim` must be 1 or 2 (the spatial dimensions), got {ndim!r}.")
    if fields.ndim != ndim + 1:
        raise ValueError(f"`fields` must be (samples, L) for ndim = 1 or (samples, L, L) for ndim = 2, got shape {fields.shape}.")
    if ndim == 2 and fields.shape[1] != fields.shape[2]:
        raise ValueError(f"2-D `fields` must be square, got shape {fields.shape}.")
    if fields.shape[0] < 2:
        raise ValueError(f"`fields` needs at least 2 samples (fluctuations are taken about their mean), got {fields.shape[0]}.")
    if not jnp.issubdtype(fields.dtype, jnp.floating):
        fields = fields.astype(jnp.result_type(float))
    v = concrete(fields)
    if v is not None and not np.all(np.isfinite(v)):
        raise ValueError(f"`fields` holds {int((~np.isfinite(v)).sum())} non-finite values.")
    return fields


def _sample_spectra(fields, ndim):
    """Per-sample $|\\widehat{\\delta\\phi}(q)|^2 / d$ of the fluctuations about the sample mean."""
    delta = fields - jnp.mean(fields, axis=0)
    axes = tuple(range(1, 1 + ndim))
    d = np.prod(fields.shape[1:])
    return jnp.abs(jnp.fft.fftn(delta, axes=axes)) ** 2 / d


def structure_factor(fields, *, ndim: int):
    r"""$S(q) = \langle |\widehat{\delta\phi}(q)|^2 \rangle / d$ of `fields` `(samples, L)` or `(samples, L, L)`
    about their sample mean, in FFT order (`fourier_modes`)."""
    fields = _fields(fields, ndim)
    return jnp.mean(_sample_spectra(fields, ndim), axis=0)


def correlation_function(fields, *, ndim: int):
    r"""$C(r) = \langle \delta\phi(x)\,\delta\phi(x + r) \rangle$ averaged over $x$ and samples (periodic), the
    inverse transform of [`structure_factor`][]; `C[0]` is the variance."""
    S = structure_factor(fields, ndim=ndim)
    return jnp.real(jnp.fft.ifftn(S, axes=tuple(range(ndim))))


class CorrelationLength(eqx.Module):
    """The second-moment correlation length (module docstring) with its jackknife standard error.

    `xi` is NaN where `xi2 <= 0` ($S(0) \\le S(q_1)$: no positive correlation to measure); `valid` says
    where it is defined. `s0`, `s1`: $S(0)$ and $S(q_1)$ (averaged over the axes)."""

    xi: jax.Array
    stderr: jax.Array
    xi2: jax.Array
    s0: jax.Array
    s1: jax.Array

    @property
    def valid(self):
        return self.xi2 > 0


def correlation_length(fields, *, ndim: int) -> CorrelationLength:
    r"""The second-moment correlation length $\xi$ of `fields` `(samples, L)` or `(samples, L, L)`:
    $\xi^2 = (S(0)/S(q_1) - 1) / (4\sin^2(\pi/L))$, with a delete-one jackknife error over samples."""
    fields = _fields(fields, ndim)
    n, side = fields.shape[0], fields.shape[1]
    spec = _sample_spectra(fields, ndim)
    s0_i = spec[(slice(None),) + (0,) * ndim]
    unit = [(1,)] if ndim == 1 else [(1, 0), (0, 1)]  # q_1 along each axis
    s1_i = sum(spec[(slice(None),) + u] for u in unit) / len(unit)
    scale = 4 * jnp.sin(jnp.pi / side) ** 2

    def xi2_of(s0, s1):
        return (s0 / s1 - 1.0) / scale

    s0, s1 = jnp.mean(s0_i), jnp.mean(s1_i)
    xi2 = xi2_of(s0, s1)
    loo0 = (n * s0 - s0_i) / (n - 1)
    loo1 = (n * s1 - s1_i) / (n - 1)
    xi_loo = jnp.sqrt(jnp.maximum(xi2_of(loo0, loo1), 0.0))
    stderr = jnp.sqrt((n - 1) / n * jnp.sum((xi_loo - jnp.mean(xi_loo)) ** 2))
    xi = jnp.where(xi2 > 0, jnp.sqrt(jnp.maximum(xi2, 0.0)), jnp.nan)
    return CorrelationLength(xi, jnp.where(xi2 > 0, stderr, jnp.nan), xi2, s0, s1)


class GinzburgLandauFit(eqx.Module):
    r"""$\lambda_t(q) \approx -(r(t) + c(t)\hat q^2)$ fitted to the top rates at small $q$, per time.

    `r`, `c`: mass and stiffness, `(...)`; `xi`: $\sqrt{c/|r|}$, NaN where $c \le 0$ (`valid` False: the
    small-$q$ rates do not fall with $q$, so they are not of Ginzburg-Landau form); `rms`: the fit's
    root-mean-square residual; `modes`: how many modes entered the fit."""

    r: jax.Array
    c: jax.Array
    xi: jax.Array
    rms: jax.Array
    modes: int = eqx.field(static=True)

    @property
    def valid(self):
        return self.c > 0


def ginzburg_landau_fit(rates: ModeRates, *, shells: int = 3) -> GinzburgLandauFit:
    r"""Least-squares fit of the top-branch rates of the `shells` smallest $\hat q^2$ shells (including
    $q = 0$) to $-(r + c\,\hat q^2)$, separately at each time of `rates`."""
    if not (isinstance(shells, int) and not isinstance(shells, bool) and shells >= 2):
        raise ValueError(f"`shells` must be an integer >= 2 (a line needs two distinct q), got {shells!r}.")
    n2 = np.sum(np.asarray(rates.wavenumbers) ** 2, -1)
    values = np.unique(n2)
    if values.size < shells:
        raise ValueError(f"`rates` has only {values.size} distinct |q| shells, fewer than `shells` = {shells}.")
    keep = np.flatnonzero(n2 <= values[shells - 1])
    x = rates.qhat2[keep]
    y = rates.rates[..., keep, 0]
    A = jnp.stack([jnp.ones_like(x), x], -1)  # y = a + b x
    coef = jnp.linalg.lstsq(A, jnp.moveaxis(y, -1, 0).reshape(len(keep), -1))[0]
    a, b = coef[0].reshape(y.shape[:-1]), coef[1].reshape(y.shape[:-1])
    rms = jnp.sqrt(jnp.mean((y - (a[..., None] + b[..., None] * x)) ** 2, -1))
    r, c = -a, -b
    xi = jnp.where(c > 0, jnp.sqrt(jnp.abs(c) / jnp.abs(r)), jnp.nan)
    return GinzburgLandauFit(r, c, xi, rms, len(keep))
