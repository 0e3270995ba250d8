r"""The DiT paper's measurements on a replica pair (Section 3): scale-split commitment scores
(eq 71-73), sigmoid midpoints with bootstrap intervals (Protocol I), and the fixed basis of
difference modes from the dual Gram matrix with its normalised energies and band gap ratio
(eq 43, 74-80; Protocol II).

```python
cos_c, cos_f = cd.coarse_fine_similarity(x1, x2, size=4)   # eq (71-72), per image pair
fit = cd.fit_sigmoid(t, curves, n_boot=1000, key=key)       # midpoint of the median curve, 95% bootstrap interval
modes = cd.difference_modes(d0)                             # eq (43): eigenpairs of the (D x D) covariance via (S x S)
e = cd.mode_energies(d_t, modes)                            # eq (75-76): (..., S, K) per seed, 1 on average at t0
r = cd.band_gap_ratio(e.mean(-2), n_band=3)                 # eq (78-80): trailing over leading band energy
```

The extracted paper lost these formulas; what is implemented is our reading of its prose,
recorded in the README ("DiT replica coupling").
"""

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from flax import nnx
from jaxtyping import Array, Float

from .._checks import concrete
from ..models.replica import _check_g, coupled_dit
from .samplers import _check_eta, _ddim_step, check_clip, timesteps

__all__ = ["DiTPairEps", "DifferenceModes", "SigmoidFit", "band_gap_ratio", "block_modes", "coarse_fine_similarity",
           "difference_modes", "dit_pair_eps", "fit_sigmoid", "hidden_differences", "mode_energies", "mode_energy_trajectory",
           "sample_replicas", "scale_split"]


# ------------------------------------------------------------------------------------------------ eq (71-73)


def _pool_matrix(n: int, size: int) -> np.ndarray:
    """(size, n): adaptive average pooling along one axis, PyTorch's windows [floor(i n/s), ceil((i+1) n/s))."""
    a = np.zeros((size, n))
    for i in range(size):
        lo, hi = (i * n) // size, -((-(i + 1) * n) // size)
        a[i, lo:hi] = 1.0 / (hi - lo)
    return a


def _upsample_matrix(n: int, size: int) -> np.ndarray:
    """(n, size): bilinear interpolation along one axis from `size` to `n` points, half-pixel centres
    (`align_corners=False`, negative source coordinates clamped to 0, as PyTorch's `interpolate`)."""
    b = np.zeros((n, size))
    for i in range(n):
        src = max((i + 0.5) * size / n - 0.5, 0.0)
        i0 = min(int(math.floor(src)), size - 1)
        i1 = min(i0 + 1, size - 1)
        lam = src - i0
        b[i, i0] += 1 - lam
        b[i, i1] += lam
    return b


def scale_split(x: Float[Array, "*batch h w c"], size: int) -> tuple[Array, Array]:
    r"""Split images (channels last) into a coarse part $U(P(x))$ and the fine residual
    $x - U(P(x))$: $P$ adaptive average pooling to `size` x `size`, $U$ bilinear upsampling back
    (eq 71-72's operators, with PyTorch's `adaptive_avg_pool2d` and `interpolate(mode="bilinear")`
    conventions). Returns `(coarse, fine)`, each shaped like `x`."""
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"`x` must be (..., H, W, C) images, channels last; got shape {x.shape}.")
    h, w = x.shape[-3], x.shape[-2]
    if not (isinstance(size, int | np.integer) and 1 <= size <= min(h, w)):
        raise ValueError(f"`size` must be an integer in [1, {min(h, w)}] (the pooled resolution); got {size!r}.")
    ph, pw = (jnp.asarray(_pool_matrix(n, int(size)), x.dtype) for n in (h, w))
    uh, uw = (jnp.asarray(_upsample_matrix(n, int(size)), x.dtype) for n in (h, w))
    pooled = jnp.einsum("ih,...hwc,jw->...ijc", ph, x, pw)
    coarse = jnp.einsum("hi,...ijc,wj->...hwc", uh, pooled, uw)
    return coarse, x - coarse


def _cosine(a, b):
    a, b = (v.reshape(v.shape[:-3] + (-1,)) for v in (a, b))
    return jnp.sum(a * b, -1) / jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))


def coarse_fine_similarity(x1, x2, size: int) -> tuple[Array, Array]:
    r"""Scale-dependent agreement of two images (eq 71-72, our reading): the cosine similarity of their
    coarse parts $U(P(x_1))$, $U(P(x_2))$ and of their fine residuals $x_i - U(P(x_i))$ (see
    [`scale_split`][]), flattened over pixels and channels. Returns `(cos_coarse, cos_fine)` over the
    leading axes; 1 means the same up to a positive factor. Their sigmoid midpoints against the
    intervention step are $t_{coarse}$ and $t_{fine}$ and the output-space gap (eq 73) is their difference."""
    x1, x2 = jnp.asarray(x1), jnp.asarray(x2)
    if x1.shape != x2.shape:
        raise ValueError(f"`x1` and `x2` must have one shape; got {x1.shape} and {x2.shape}.")
    (c1, f1), (c2, f2) = scale_split(x1, size), scale_split(x2, size)
    return _cosine(c1, c2), _cosine(f1, f2)


# ------------------------------------------------------------------------------------------------ sigmoid fits


class SigmoidFit(NamedTuple):
    """A sigmoid $y = a + b / (1 + e^{-(t - t_0)/w})$ fitted to the median curve over seeds.

    - `midpoint`: $t_0$ (the inflection and the 50% level between $a$ and $a + b$); NaN if the fit failed.
    - `params`: $(a, b, t_0, w)$; $w < 0$ for a curve falling in $t$.
    - `interval`: the bootstrap percentile interval of $t_0$ at `level` (seeds resampled with replacement).
    - `boot_failed`: how many bootstrap refits did not converge (left out of the interval).
    - `median`: the median curve that was fitted.
    """

    midpoint: float
    params: np.ndarray
    interval: tuple[float, float]
    boot_failed: int
    median: np.ndarray


def _sigmoid(p, t):
    a, b, t0, w = p
    return a + b * jax.nn.sigmoid((t - t0) / w)


def _width(theta, sign, w_min):
    """The signed width from its free coordinate: |w| = w_min + exp(theta) never reaches w_min or crosses 0."""
    return sign * (w_min + jnp.exp(theta))


def _fit_from(t, y, p0, w_min):
    sign = jnp.sign(p0[3])
    free0 = p0.at[3].set(jnp.log(jnp.maximum(jnp.abs(p0[3]) - w_min, w_min)))
    model = lambda q: _sigmoid(q.at[3].set(_width(q[3], sign, w_min)), t)  # noqa: E731
    solver = optx.LevenbergMarquardt(rtol=1e-8, atol=1e-10)
    sol = optx.least_squares(lambda q, args: model(q) - y, solver, free0, max_steps=400, throw=False)
    p = sol.value.at[3].set(_width(sol.value[3], sign, w_min))
    return _checked(sol, p, t, y)


def _fit_at_floor(t, y, p0, w_min):
    """The same with the width held at its floor (three parameters): the fit for a step sharper than the grid,
    where the free width runs to the floor and the solver never meets its tolerance there."""
    w = jnp.sign(p0[3]) * w_min
    solver = optx.LevenbergMarquardt(rtol=1e-8, atol=1e-10)
    sol = optx.least_squares(lambda q, args: _sigmoid(jnp.append(q, w), t) - y, solver, p0[:3], max_steps=400, throw=False)
    return _checked(sol, jnp.append(sol.value, w), t, y)


def _checked(sol, p, t, y):
    ok = (sol.result == optx.RESULTS.successful) & jnp.all(jnp.isfinite(p))
    return jnp.where(ok, p, jnp.nan), jnp.where(ok, jnp.sum(jnp.square(_sigmoid(p, t) - y)), jnp.inf)


def _fit_one(t, y, p0):
    """Levenberg-Marquardt from `N_STARTS` midpoints spread over the window (the start's levels and width
    otherwise), the best converged fit kept: a median curve that dips before it rises (seen in Protocol I)
    sends a single start into a far-off, nearly linear solution. The width is bounded below by a quarter of
    the finest grid spacing: a sharper step is unresolved between two grid points (any midpoint between
    them fits almost as well), and without the bound the solver chases w -> 0; each start is also fitted
    with the width at that floor."""
    w_min = jnp.min(jnp.diff(t)) / 4
    t0s = jnp.concatenate([p0[2:3], jnp.linspace(t[0], t[-1], N_STARTS - 1)])
    starts = jax.vmap(lambda t0: p0.at[2].set(t0))(t0s)
    p_free, e_free = jax.vmap(lambda q: _fit_from(t, y, q, w_min))(starts)
    p_floor, e_floor = jax.vmap(lambda q: _fit_at_floor(t, y, q, w_min))(starts)
    ps, sse = jnp.concatenate([p_free, p_floor]), jnp.concatenate([e_free, e_floor])
    return ps[jnp.argmin(sse)]


N_STARTS = 4


def _start(t, y):
    lo, hi = jnp.min(y), jnp.max(y)
    rising = jnp.mean((t - t.mean()) * (y - y.mean())) >= 0
    mid = (lo + hi) / 2
    t0 = t[jnp.argmin(jnp.abs(y - mid))]
    w = (t[-1] - t[0]) / 8
    return jnp.stack([lo, hi - lo, t0, jnp.where(rising, w, -w)])


@eqx.filter_jit
def _fit_median(t, curves):
    y = jnp.median(curves, axis=0)
    return _fit_one(t, y, _start(t, y)), y


@eqx.filter_jit
def _fit_boot(t, curves, idx):
    def one(rows):
        y = jnp.median(curves[rows], axis=0)
        return _fit_one(t, y, _start(t, y))[2]
    return jax.vmap(one)(idx)


def fit_sigmoid(t, curves, *, n_boot: int = 1000, level: float = 0.95, key=None) -> SigmoidFit:
    r"""Fit $a + b\,\sigma((t - t_0)/w)$ by Levenberg-Marquardt (optimistix) to the median over seeds of
    `curves` (S, T) against `t` (T,), and a percentile bootstrap interval for the midpoint $t_0$: seeds
    resampled with replacement `n_boot` times (one vmapped batch of fits), each median curve refitted.

    The midpoint is the paper's speciation proxy (Protocol I, Table 1) and, for the coarse and fine
    scores, $t_{coarse}$ and $t_{fine}$ (eq 73). `t` must be increasing; a curve without a transition
    in the window can give a midpoint outside it, which is reported as fitted, not clipped. The
    width $|w|$ is kept above a quarter of the finest spacing of `t` (a sharper step cannot be
    resolved between grid points); a fit that does not converge gives NaN.
    """
    t = np.asarray(t, np.float64).reshape(-1)
    curves = np.asarray(curves, np.float64)
    if curves.ndim == 1:
        curves = curves[None]
    if curves.ndim != 2 or curves.shape[1] != t.size:
        raise ValueError(f"`curves` must be (seeds, {t.size}) to match `t`; got shape {curves.shape}.")
    if t.size < 5 or not np.all(np.diff(t) > 0) or not np.all(np.isfinite(t)):
        raise ValueError(f"`t` must be at least 5 finite, strictly increasing points (4 parameters are fitted); got {t.tolist()}.")
    if not np.all(np.isfinite(curves)):
        raise ValueError("`curves` must be finite.")
    if not 0 < level < 1:
        raise ValueError(f"`level` must lie in (0, 1); got {level}.")
    if not (isinstance(n_boot, int | np.integer) and n_boot >= 0):
        raise ValueError(f"`n_boot` must be a non-negative integer; got {n_boot!r}.")
    tj, cj = jnp.asarray(t), jnp.asarray(curves)
    params, median = _fit_median(tj, cj)
    params = np.asarray(params)
    interval, failed = (float("nan"), float("nan")), 0
    if n_boot:
        key = jax.random.key(0) if key is None else key
        idx = jax.random.randint(key, (int(n_boot), curves.shape[0]), 0, curves.shape[0])
        mids = np.asarray(_fit_boot(tj, cj, idx))
        good = mids[np.isfinite(mids)]
        failed = int(mids.size - good.size)
        if good.size:
            q = np.quantile(good, [(1 - level) / 2, (1 + level) / 2])
            interval = (float(q[0]), float(q[1]))
    return SigmoidFit(float(params[2]), params, interval, failed, np.asarray(median))


# ------------------------------------------------------------------------------------------------ eq (43, 74-80)


class DifferenceModes(eqx.Module):
    """The fixed basis of principal difference modes (eq 43): `eigenvalues` (K,), decreasing, of the
    initial difference covariance $C_0 = D_0^\\top D_0 / S$, and `basis` (K, D), its unit eigenvectors."""

    eigenvalues: Float[Array, " k"]
    basis: Float[Array, "k d"]


def difference_modes(d0: Float[Array, "s d"], *, rank: int | None = None, rtol: float = 1e-8) -> DifferenceModes:
    r"""Principal modes of the initial replica differences `d0` (S paired seeds x D flattened
    features, eq 74 at the first step) through the dual Gram matrix $G = D_0 D_0^\top / S$ (S x S,
    eq 43): $G u_k = \lambda_k u_k$ gives the nonzero eigenpairs of $C_0 = D_0^\top D_0 / S$ with
    $e_k = D_0^\top u_k / \sqrt{S \lambda_k}$, so no (D x D) matrix is ever formed. Modes with
    $\lambda_k \le$ `rtol` x $\lambda_1$ are dropped (at most S modes exist); `rank` keeps the top ones.
    The second moment is uncentred: the difference of two exchangeable replicas has mean zero."""
    d0 = jnp.asarray(d0)
    if d0.ndim != 2 or d0.shape[0] < 2:
        raise ValueError(f"`d0` must be (seeds, features) with at least 2 seeds; got shape {d0.shape}.")
    s = d0.shape[0]
    w, u = jnp.linalg.eigh(d0 @ d0.T / s)
    w, u = w[::-1], u[:, ::-1]
    wn = np.asarray(w)
    keep = int(np.sum(wn > rtol * max(wn[0], 0)))
    if keep == 0:
        raise ValueError("`d0` has no difference energy: every seed's replicas are identical.")
    if rank is not None:
        if not (isinstance(rank, int | np.integer) and rank >= 1):
            raise ValueError(f"`rank` must be a positive integer; got {rank!r}.")
        keep = min(keep, int(rank))
    w, u = w[:keep], u[:, :keep]
    basis = (u.T @ d0) / jnp.sqrt(s * w)[:, None]
    return DifferenceModes(eigenvalues=w, basis=basis)


def mode_energies(d: Float[Array, "*batch s d"], modes: DifferenceModes) -> Array:
    r"""Normalised energies of the fixed modes (eq 75-76): per seed, $(e_k \cdot d_s)^2 / \lambda_k$,
    shape (..., S, K). Their mean over seeds is $e_k^\top C_t e_k / \lambda_k$, which is 1 at the
    step where the modes were built and tracks how much of mode k's initial energy remains."""
    d = jnp.asarray(d)
    if d.shape[-1] != modes.basis.shape[-1]:
        raise ValueError(f"`d` must end in the modes' feature size {modes.basis.shape[-1]}; got shape {d.shape}.")
    return jnp.square(d @ modes.basis.T) / modes.eigenvalues


def band_gap_ratio(energies: Float[Array, "*batch k"], n_band: int) -> Array:
    r"""The internal gap ratio (eq 78-80): the mean normalised energy of the trailing band (the
    `n_band` modes of smallest initial eigenvalue) over that of the leading band (the `n_band`
    largest). $R > 1$: trailing modes keep more of their energy than leading ones."""
    energies = jnp.asarray(energies)
    k = energies.shape[-1]
    if not (isinstance(n_band, int | np.integer) and 1 <= n_band and 2 * n_band <= k):
        raise ValueError(f"`n_band` must be a positive integer with 2 n_band <= {k} modes; got {n_band!r}.")
    return energies[..., -n_band:].mean(-1) / energies[..., :n_band].mean(-1)


# ------------------------------------------------------------------------------------------------ the pair's sampler


class DiTPairEps(eqx.Module):
    r"""A [`DiT`][] run as a coupled replica pair, as a pure PyTree callable for [`sample_replicas`][]
    (split once, merged in the trace, so one compiled sampler serves every call):
    `pair(z_pair, t, g)` with `z_pair` (2, B, H, W, C) returns the pair's eps (2, B, H, W, C), the
    first C output channels of [`coupled_dit`][] (a `learn_sigma` DiT's variance channels are
    dropped); `pair.with_hidden(z_pair, t, g)` also returns the blocks' token states
    (depth, 2, B, N, D). `y`: the labels (B,), shared by both replicas (None: unconditional);
    `blocks`: the coupled blocks (default all)."""

    graphdef: object = eqx.field(static=True)
    state: object
    y: Array | None
    blocks: tuple[int, ...] | None = eqx.field(static=True)

    def __init__(self, model, y=None, *, blocks=None):
        self.graphdef, self.state = nnx.split(model)
        self.y = None if y is None else jnp.asarray(y)
        self.blocks = None if blocks is None else tuple(int(i) for i in blocks)

    def with_hidden(self, z, t, g):
        out, hidden = coupled_dit(nnx.merge(self.graphdef, self.state), z, t, self.y, g=g, blocks=self.blocks,
                                  return_hidden=True)
        return out[..., : z.shape[-1]], hidden

    def __call__(self, z, t, g):
        return coupled_dit(nnx.merge(self.graphdef, self.state), z, t, self.y, g=g, blocks=self.blocks)[..., : z.shape[-1]]


def dit_pair_eps(model, y=None, *, blocks=None) -> DiTPairEps:
    """The eps function of a [`DiT`][] run as a coupled replica pair: a [`DiTPairEps`][]."""
    return DiTPairEps(model, y, blocks=blocks)


def _pair_cut(decouple_at, T: int, b: int):
    """`decouple_at` as an int32 array, scalar or (B,); -1 (or None) couples throughout."""
    if decouple_at is None:
        return jnp.int32(-1)
    v = concrete(jnp.asarray(decouple_at))
    if v is not None:
        if not (np.issubdtype(v.dtype, np.integer) and v.shape in ((), (b,)) and np.all((-1 <= v) & (v < T))):
            raise ValueError(f"`decouple_at` must be None or timesteps in [0, {T}) (-1: never), an integer or one per pair (shape ({b},)); "
                             f"got {v.tolist() if v.size < 20 else v.shape}.")
    return jnp.asarray(decouple_at, jnp.int32)


def sample_replicas(eps_pair, schedule, key, z_pair, *, g, decouple_at=None, num_steps: int | None = None,
                    eta: float = 0.0, shared_noise: bool = False, clip: float | None = None) -> Array:
    r"""DDIM (Song et al. eq 12; `eta = 0` deterministic, `eta = 1` DDPM-like) driving a replica pair,
    the samplers of the DiT paper's two protocols. Compiled once per eps function, shape and
    sampler setting: `g` and `decouple_at` are traced, so a sweep reuses one program.

    **Arguments:**

    - `eps_pair`: `eps_pair(z_pair, t, g)` -> the pair's eps, e.g. [`dit_pair_eps`][]; `t` is (B,), `g`
      a scalar or (B,). A PyTree (an `eqx.Module`) or a function.
    - `schedule`: the [`VPSchedule`][]; `key`: the noise key; `z_pair`: (2, B, ...) the starts at the
      first timestep (e.g. from [`replica_init`][]).
    - `g`: the coupling strength for the steps at timesteps `t > decouple_at` (all steps when
      `decouple_at` is None: Protocol II); at and after `decouple_at` the replicas run uncoupled (g = 0,
      Protocol I's intervention; -1, like None, couples throughout). Both may be scalars or one value
      per pair, shape (B,): a grid of couplings and intervention steps in one batch.
    - `shared_noise`: both replicas take the same noise draw while coupled (`t > decouple_at`) and
      independent draws after; with `g = 0` this is the uncoupled control of the paper's Figure 5.
      By default the draws are independent throughout.
    - `num_steps`, `eta`, `clip`: as in [`sample`][].

    **Returns:** the pair at the clean end, (2, B, ...).
    """
    z_pair = jnp.asarray(z_pair)
    if z_pair.ndim < 2 or z_pair.shape[0] != 2:
        raise ValueError(f"`z_pair` must be (2, B, ...), the two replicas first; got shape {z_pair.shape}.")
    _check_eta(eta)
    clip = check_clip(clip)
    b = z_pair.shape[1]
    g = _check_g(g, batch=(b,))
    ts = timesteps(schedule.T, num_steps)
    cut = _pair_cut(decouple_at, schedule.T, b)
    return _sample_replicas(eps_pair, schedule, key, z_pair, g, cut, len(ts), float(eta), bool(shared_noise), clip)


def _per_pair(a, like):
    """A scalar or (B,) array broadcast against (B, ...) = `like`'s per-pair layout."""
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def _pair_step(schedule, z, eps_hat, t, tp, noise, eta, clip):
    """One DDIM step of both replicas, `z` and `eps_hat` (2, B, ...), `noise` (2, B, ...) or None."""
    b = z.shape[1]
    flat = lambda a: a.reshape((2 * b,) + a.shape[2:])  # noqa: E731
    full = lambda v: jnp.full((2 * b,), v, jnp.int32)  # noqa: E731
    out = _ddim_step(schedule, flat(z), flat(eps_hat.astype(z.dtype)), full(t), full(tp), None if noise is None else flat(noise),
                     eta, clip)
    return out.reshape(z.shape)


@eqx.filter_jit
def _sample_replicas(eps_pair, schedule, key, z_pair, g, cut, num_steps, eta, shared_noise, clip):
    ts = timesteps(schedule.T, num_steps)
    b = z_pair.shape[1]
    t_prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)

    def body(z, inp):
        i, t, tp = inp
        coupled = t > cut  # scalar or (B,)
        eps_hat = eps_pair(z, jnp.full((b,), t, jnp.int32), jnp.where(coupled, g, jnp.zeros_like(g)))
        n = None
        if eta > 0:
            n = jax.random.normal(jax.random.fold_in(key, i), z.shape, z.dtype)
            if shared_noise:
                n = jnp.where(_per_pair(coupled, n[0]), jnp.stack([n[0], n[0]]), n)
        return _pair_step(schedule, z, eps_hat, t, tp, n, eta, clip), None

    xs = (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts), jnp.asarray(t_prev))
    z, _ = jax.lax.scan(body, z_pair, xs)
    return z


def hidden_differences(pair: DiTPairEps, z_pair, t, *, g) -> Array:
    r"""The flattened hidden-state differences between the replicas at every block (eq 74) for one
    forward of the coupled pair at timestep `t` (a scalar): shape (depth, B, N D). At the first
    step of a trajectory these build the fixed basis of Protocol II (per block, [`difference_modes`][])."""
    z_pair = jnp.asarray(z_pair)
    b = z_pair.shape[1]
    return _hidden_differences(pair, z_pair, jnp.full((b,), t, jnp.int32), _check_g(g, batch=(b,)))


@eqx.filter_jit
def _hidden_differences(pair, z_pair, t, g):
    _, hidden = pair.with_hidden(z_pair, t, g)
    d = hidden[:, 0] - hidden[:, 1]
    return d.reshape(d.shape[:2] + (-1,))


def block_modes(d0: Float[Array, "depth s d"], *, rank: int | None = None) -> DifferenceModes:
    """[`difference_modes`][] of each block's initial differences `d0` (depth, S, D), stacked:
    eigenvalues (depth, K) and basis (depth, K, D), K the smallest rank kept over the blocks (and
    at most `rank`)."""
    d0 = jnp.asarray(d0)
    if d0.ndim != 3:
        raise ValueError(f"`d0` must be (depth, seeds, features); got shape {d0.shape}.")
    per = [difference_modes(d0[i], rank=rank) for i in range(d0.shape[0])]
    k = min(m.eigenvalues.shape[0] for m in per)
    return DifferenceModes(eigenvalues=jnp.stack([m.eigenvalues[:k] for m in per]), basis=jnp.stack([m.basis[:k] for m in per]))


def mode_energy_trajectory(pair: DiTPairEps, schedule, z_pair, modes: DifferenceModes, *, g,
                           num_steps: int | None = None, clip: float | None = None) -> Array:
    r"""Protocol II's trajectory: deterministic DDIM ($\eta = 0$) of the pair coupled at constant `g`
    from `z_pair`, and at every step and block the normalised energies (eq 75-76) of the hidden
    difference in that block's fixed modes (`modes` from [`block_modes`][]): shape (steps, depth, B, K),
    the steps in sampling order (decreasing timestep), one forward per step."""
    z_pair = jnp.asarray(z_pair)
    b = z_pair.shape[1]
    g = _check_g(g, batch=(b,))
    return _energy_trajectory(pair, schedule, z_pair, modes, g, len(timesteps(schedule.T, num_steps)), check_clip(clip))


@eqx.filter_jit
def _energy_trajectory(pair, schedule, z_pair, modes, g, num_steps, clip):
    ts = timesteps(schedule.T, num_steps)
    b = z_pair.shape[1]
    t_prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)

    def body(z, inp):
        t, tp = inp
        eps_hat, hidden = pair.with_hidden(z, jnp.full((b,), t, jnp.int32), g)
        d = (hidden[:, 0] - hidden[:, 1]).reshape(hidden.shape[0], b, -1).astype(modes.basis.dtype)
        e = jnp.square(jnp.einsum("lsd,lkd->lsk", d, modes.basis)) / modes.eigenvalues[:, None, :]
        return _pair_step(schedule, z, eps_hat, t, tp, None, 0.0, clip), e

    _, energies = jax.lax.scan(body, z_pair, (jnp.asarray(ts), jnp.asarray(t_prev)))
    return energies
