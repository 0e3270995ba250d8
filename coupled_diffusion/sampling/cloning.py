r"""Cloning (speciation) and memorisation (collapse) experiments with exact scores.

- [`clone_agreement`][]: master reverse trajectories are split at branch times into two
  clones with independent noise; the fraction of clone pairs that end in the same class
  rises from 1/2 (branching before speciation, in the noise) to 1 (after it). Biroli
  et al. (2024) for $k = 1$; any $k$ and any M here.
- [`memorization_curve`][]: reverse trajectories under the empirical score of $n$
  training points; the fraction of samples whose largest posterior weight (eq 31)
  exceeds 1/2, as a function of time, against the REM collapse time.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..theory.mixture import TwoClassMixture
from ..theory.moments import MomentPath
from ..theory.ou import CoupledOU
from .draws import realize_means, sample_empirical, sample_marginal
from .scores import EmpiricalScore, PopulationScore
from .sde import continue_reverse_sde, reverse_sde


def wilson_interval(successes, n, z: float = 1.959963984540054):
    r"""Wilson score interval for a binomial proportion (95% by default): `(lower, upper)`."""
    successes = jnp.asarray(successes, jnp.result_type(float))
    p = successes / n
    denom = 1 + z**2 / n
    center = (p + z**2 / (2 * n)) / denom
    half = z * jnp.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    # the interval contains p exactly; clamp away rounding at p = 0 or 1
    return jnp.minimum(center - half, p), jnp.maximum(center + half, p)


def last_crossing_time(t, values, level: float) -> float:
    r"""The largest $t$ at which a curve falling with $t$ is still $\ge$ `level`, linearly
    interpolated to the next grid time; NaN if it never reaches `level` or never leaves it."""
    t, a = np.asarray(t), np.asarray(values)
    order = np.argsort(t)
    t, a = t[order], a[order]
    above = np.nonzero(a >= level)[0]
    if len(above) == 0 or above[-1] == len(t) - 1:
        return float("nan")
    j = above[-1]
    return float(t[j] + (a[j] - level) / (a[j] - a[j + 1]) * (t[j + 1] - t[j]))


class ProportionCurve(eqx.Module):
    """A binomial proportion measured at several times, with 95% Wilson intervals.

    What [`clone_agreement`][] (the fraction of clone pairs that agree, per branch time) and
    [`memorization_curve`][] (the fraction of memorised samples, per time) return.

    **Attributes:**

    - `t`: the times, increasing.
    - `value`: the proportion at each time; `lower`, `upper`: its 95% Wilson interval.
    - `n`: the number of trials behind each proportion.
    - `level`: the curve's natural threshold, the default of [`ProportionCurve.crossing`][]
        (0.75 for clone agreement, 1/2 for memorisation).

    The names of the two experiments read too: `t_branch` and `agreement`, `n_pairs`
    (cloning); `fraction`, `n_samples` (memorisation).
    """

    t: jax.Array
    value: jax.Array
    lower: jax.Array
    upper: jax.Array
    n: int = eqx.field(static=True)
    level: float = eqx.field(static=True, default=0.5)

    def crossing(self, level: float | None = None):
        r"""The largest time at which the curve (falling with $t$) is still $\ge$ `level` (default `self.level`),
        linearly interpolated to the next time; NaN if it never reaches `level` or never leaves it."""
        return last_crossing_time(self.t, self.value, self.level if level is None else level)

    t_branch = property(lambda self: self.t, doc="The branch times (cloning).")
    agreement = property(lambda self: self.value, doc="The clone agreement (cloning).")
    fraction = property(lambda self: self.value, doc="The memorised fraction (memorisation).")
    n_pairs = property(lambda self: self.n, doc="Clone pairs per branch time (cloning).")
    n_samples = property(lambda self: self.n, doc="Samples per time (memorisation).")


CloneCurve = ProportionCurve  # the names under which the two experiments' curves were introduced
MemorizationCurve = ProportionCurve


def clone_agreement_theory(ou: CoupledOU, data: TwoClassMixture, t, *, dim: int, n_nodes: int = 96):
    r"""The exact clone-agreement curve of the population reverse process.

    With the exact score, a clone started from $z$ at time $t$ ends in class $+$ with the
    posterior probability $p(z) = \sigma(2u)$, $u = \mu(t)^\top C(t)^{-1} z$, independently
    of its twin, so two clones agree with probability $p^2 + (1-p)^2$. Under either class
    $u \sim N(\pm a, a)$ with $a = d \operatorname{tr}(C^{-1} G(t))$, hence
    $\phi(t) = E_{u \sim N(a, a)}[\sigma(2u)^2 + \sigma(-2u)^2]$, evaluated by
    Gauss-Hermite quadrature. (A sampled curve also carries the time-discretisation
    error and the small chance that a final sample sits on the wrong side of the
    classification hyperplane.) Vectorised over `t`; constant M only.
    """
    ou.require_constant("clone_agreement_theory")
    t = jnp.asarray(t, jnp.result_type(float))
    path = MomentPath.of(ou, 0.0)

    def one(tt):
        E, Q = path(tt)
        C = E @ (data.variances[:, None] * E.T) + Q
        return dim * jnp.trace(jnp.linalg.solve(C, E @ data.gram @ E.T))

    return _agreement(jnp.vectorize(one)(t), n_nodes)


def _agreement(a, n_nodes: int):
    r"""$E_{u \sim N(a, a)}[\sigma(2u)^2 + \sigma(-2u)^2]$ elementwise in `a` >= 0, by Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(n_nodes)
    x, w = jnp.asarray(x, a.dtype), jnp.asarray(w / w.sum(), a.dtype)
    p = jax.nn.sigmoid(2 * (a[..., None] + jnp.sqrt(a)[..., None] * x))
    return jnp.sum(w * (p**2 + (1 - p) ** 2), -1)


def mode_clone_agreement_theory(ou: CoupledOU, data: TwoClassMixture, t, *, dim: int, n_nodes: int = 96):
    r"""Per-eigenmode clone-agreement curves of a symmetric M, shape `t.shape + (k,)` in [`mode_hierarchy`][]
    order: mode $i$'s curve is [`clone_agreement_theory`][] with only that mode's share of the class information,
    $a_i(t) = d\,m_i^2 e^{2\lambda_i t} / c_i(t)$, $c_i = \sigma^2 e^{2\lambda_i t} + \sigma_W^2 (e^{2\lambda_i t} - 1)/(2\lambda_i)$
    (the joint curve has $a = \sum_i a_i$, since $C(t)$ is diagonal in the eigenbasis). It is the curve an
    exact-score cloning experiment measures when the class means lie along $v_i$ alone, and it rises through
    1/2-ish agreement around that mode's finite-d speciation time (`mode_speciation_times(..., dim=d)`)."""
    from ..theory.modes import mode_decomposition

    ou.require_constant("mode_clone_agreement_theory")
    lam, m2, sigma2, _ = mode_decomposition(ou, data)
    t = jnp.asarray(t, lam.dtype)[..., None]
    e = jnp.exp(2 * lam * t)
    a = jnp.maximum(dim * m2, 0.0) * e / (sigma2 * e + ou.sigma_w2 * jnp.expm1(2 * lam * t) / (2 * lam))  # m2 >= 0 up to rounding
    return _agreement(a, n_nodes)


@eqx.filter_jit
def _clone_pairs(ou, score, z_b, key, t_from, t_max, dt, increments, max_steps):
    pair = jnp.stack([z_b, z_b])  # two clones of every master state, one noise draw per step for both
    return continue_reverse_sde(ou, score, pair, key=key, t_from=t_from, t_max=t_max, dt=dt, max_steps=max_steps,
                                increments=increments)


@eqx.filter_jit
def _master(ou, score, z, key, t_max, t_low, n_steps, save_at, increments):
    return reverse_sde(ou, score, z, key=key, t_start=t_max, t_end=t_low, n_steps=n_steps, save_at=save_at, increments=increments)


def clone_agreement(
    ou: CoupledOU,
    data: TwoClassMixture,
    t_branch,
    *,
    dim: int,
    n_pairs: int,
    n_steps: int,
    t_max: float,
    key,
    increments: str = "gaussian",
    means=None,
    dtype=jnp.float32,
) -> ProportionCurve:
    r"""Fraction of clone pairs that end in the same class, per branch time (Biroli et al. 2024).

    `n_pairs` master trajectories start from the exact $P_{t_{max}}$ and run the reverse SDE
    (Euler-Maruyama with the population score, `n_steps` uniform steps over $[0, t_{max}]$)
    down to each branch time (rounded to the grid); there each is split into two clones
    that continue to $t = 0$ with independent noise. A clone's class is the sign of its
    projection on the class-mean direction $\mu(0)$ (all modalities). Works for any $k$,
    including $k = 1$ (`CoupledOU(M=[[-beta]], ...)`).

    Compare the curve's location with `speciation_time(ou, data, dim=dim)` (the unscaled,
    finite-$d$ criterion $d\,\kappa = 1$), not the per-dimension one.

    **Returns:** a [`ProportionCurve`][] (agreement and 95% Wilson interval per branch time,
    at the grid-rounded branch times).
    """
    t_branch = np.atleast_1d(np.asarray(t_branch, float))
    if not (isinstance(n_pairs, int) and n_pairs >= 1):
        raise ValueError(f"`n_pairs` must be a positive integer, got {n_pairs!r}.")
    if not (isinstance(n_steps, int) and n_steps >= 2):
        raise ValueError(f"`n_steps` must be an integer >= 2, got {n_steps!r}.")
    if not t_max > 0:
        raise ValueError(f"`t_max` must be > 0, got {t_max}.")
    if np.any(t_branch <= 0) or np.any(t_branch >= t_max):
        raise ValueError(f"Every `t_branch` must lie in (0, t_max) = (0, {t_max}), got {t_branch.tolist()}.")
    dt = t_max / n_steps
    idx = np.clip(np.round(t_branch / dt).astype(int), 1, n_steps - 1)
    uniq = np.unique(idx)
    means = realize_means(data, dim) if means is None else jnp.asarray(means)
    means = means.astype(dtype)
    score = PopulationScore.of(ou, data, means, t_max=t_max)
    k_init, k_master, k_clone = jax.random.split(key, 3)
    z, _ = sample_marginal(k_init, score.path, data, means, t_max, n_pairs)
    z = z.astype(dtype)
    low = int(uniq.min())
    save_at = jnp.asarray(uniq[::-1] * dt, dtype)  # forward times, descending = increasing reverse time
    saved, _ = _master(ou, score, z, k_master, jnp.asarray(t_max, dtype), jnp.asarray(low * dt, dtype), n_steps - low,
                       save_at, increments)
    direction = means
    agree = {}
    for j, i_b in enumerate(uniq[::-1]):
        ends = _clone_pairs(ou, score, saved[j], jax.random.fold_in(k_clone, int(i_b)), jnp.asarray(i_b * dt, dtype),
                            jnp.asarray(t_max, dtype), jnp.asarray(dt, dtype), increments, n_steps + 1)
        cls = jnp.sign(jnp.sum(ends * direction, axis=(-2, -1)))
        agree[int(i_b)] = int(jnp.sum(cls[0] == cls[1]))
    counts = np.array([agree[int(i)] for i in idx])
    lo, hi = wilson_interval(counts, n_pairs)
    return ProportionCurve(jnp.asarray(idx * dt), jnp.asarray(counts / n_pairs), lo, hi, n_pairs, level=0.75)


def memorization_curve(
    ou: CoupledOU,
    points,
    t_eval,
    *,
    n_samples: int,
    n_steps: int,
    t_max: float,
    key,
    chunk: int = 2048,
    increments: str = "gaussian",
) -> ProportionCurve:
    r"""Memorisation under the exact empirical score of `points` (shape `(n, k, d)`).

    `n_samples` trajectories start from the exact $p^{(n)}_{t_{max}}$ and run the reverse
    SDE (Euler-Maruyama, `n_steps` uniform steps over $[0, t_{max}]$); at each time in
    `t_eval` (rounded to the grid, > 0) the fraction of samples with
    $\max_i w_i > 1/2$ (eq 31) is recorded, with a Wilson interval. Compare the
    curve's crossing of 1/2 with `collapse_time(ou, data, alpha=log(n) / (k d))`.
    """
    points = jnp.asarray(points)
    t_eval = np.atleast_1d(np.asarray(t_eval, float))
    if np.any(t_eval <= 0) or np.any(t_eval >= t_max):
        raise ValueError(f"Every `t_eval` must lie in (0, t_max) = (0, {t_max}), got {t_eval.tolist()}.")
    dt = t_max / n_steps
    idx = np.unique(np.clip(np.round(t_eval / dt).astype(int), 1, n_steps - 1))
    score = EmpiricalScore.of(ou, points, chunk=chunk, t_max=t_max)
    k_init, k_run = jax.random.split(key)
    z = sample_empirical(k_init, score.path, points, t_max, n_samples)
    times = jnp.asarray(idx[::-1] * dt, points.dtype)
    saved, _ = _master(ou, score, z, k_run, jnp.asarray(t_max, points.dtype), jnp.asarray(idx.min() * dt, points.dtype),
                       n_steps - int(idx.min()), times, increments)
    frac = jax.lax.map(lambda a: jnp.mean(score.max_weight(a[0], a[1])[0] > 0.5), (times, saved))
    counts = np.rint(np.asarray(frac) * n_samples)
    lo, hi = wilson_interval(counts, n_samples)
    return ProportionCurve(times[::-1], jnp.asarray(frac)[::-1], lo[::-1], hi[::-1], n_samples, level=0.5)

