r"""Synchronization diagnostics of reverse trajectories (Section 5.1-5.2, eq 98-100, 104-108).

Host-side (NumPy) post-processing of what [`sample`][] logs and of classifier labels: small
arrays, evaluated once per run, where a clear error beats a traced NaN.

- Protocol I: [`cosine_to_final`][] (eq 98), [`crossing_time`][] (eq 99), [`sync_gaps`][]
  (eq 100), [`ghosting_index`][] (eq 107-108), [`rms_change`][] (the intervention test, eq 101).
- Protocol II: [`agreement`][] (eq 104) with its Wilson interval, [`excess_agreement`][]
  (eq 105, bounds mapped through the same map), [`speciation_crossing`][] (eq 106, linear
  interpolation between scan points).

A threshold that a curve never reaches is a status, not a number: every crossing is a
[`Crossing`][] whose `time` is NaN unless `status == "crossed"`.

Time runs as in the paper: `t` is the diffusion timestep, large at the noise end, so the
reverse process meets large `t` first and "the earliest step met by the reverse process" is
the *largest* `t` satisfying the condition.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..sampling.cloning import wilson_interval

STATUSES = ("crossed", "never_reached", "from_start", "undefined")


@dataclasses.dataclass(frozen=True)
class Crossing:
    """Where a curve first (in reverse time) reaches a threshold.

    **Attributes:**

    - `time`: the crossing timestep (interpolated for [`speciation_crossing`][]); NaN unless `status` is "crossed".
    - `status`: "crossed"; "never_reached" (the curve stays below the threshold at every logged
        step); "from_start" (it is already at or above it at the largest logged `t`, so the crossing
        happened at or before `bound` and is censored); "undefined" (there is no curve to cross, e.g.
        eq (105) when independent samples always agree).
    - `bound`: for "from_start", the largest logged `t` (a lower bound on the crossing time).
    """

    time: float
    status: str
    bound: float | None = None

    @property
    def found(self) -> bool:
        return self.status == "crossed"

    def to_json(self) -> dict:
        return {"time": None if not self.found else self.time, "status": self.status, "bound": self.bound}


def _curve(t, values, name: str):
    t, v = np.asarray(t, np.float64), np.asarray(values, np.float64)
    if t.ndim != 1 or v.shape != t.shape or len(t) == 0:
        raise ValueError(f"`t` and `{name}` must be 1-D of the same non-zero length, got shapes {t.shape} and {v.shape}.")
    if not np.all(np.isfinite(t)) or len(np.unique(t)) != len(t):
        raise ValueError(f"`t` must hold distinct finite times, got {t.tolist()[:8]}.")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"`{name}` holds non-finite values at t = {t[~np.isfinite(v)].tolist()[:8]}.")
    order = np.argsort(t)
    return t[order], v[order]


def check_level(level, name: str) -> float:
    x = float(level)
    if not (0 < x < 1):
        raise ValueError(f"`{name}` must lie in (0, 1), got {level!r}.")
    return x


def cosine_to_final(m_log, final=None) -> np.ndarray:
    r"""$\mathrm{Cos}_m(t)$ of eq (98): the batch mean of $\cos(m(t), m_\star)$, images flattened.

    `m_log`: `(L, B, ...)` one mode's logged predictions in the order they were logged (reverse
    time: decreasing `t`); `final`: `(B, ...)` the reference $m_\star$, by default the last
    logged row (the paper's "last logged prediction near t = 0"). Returns `(L,)`. A sample whose
    vectors have zero norm has no cosine: that raises, naming the row and the sample.
    """
    m = np.asarray(m_log, np.float64)
    if m.ndim < 2:
        raise ValueError(f"`m_log` must be (L, B, ...) logged predictions, got shape {m.shape}.")
    ref = m[-1] if final is None else np.asarray(final, np.float64)
    if ref.shape != m.shape[1:]:
        raise ValueError(f"`final` must have the shape of one logged row {m.shape[1:]}, got {ref.shape}.")
    a, b = m.reshape(m.shape[0], m.shape[1], -1), ref.reshape(ref.shape[0], -1)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    if np.any(nb == 0):
        raise ValueError(f"the reference prediction of sample {int(np.flatnonzero(nb == 0)[0])} is zero: no cosine is defined.")
    if np.any(na == 0):
        row, sample = (int(i[0]) for i in np.nonzero(na == 0))
        raise ValueError(f"the logged prediction of sample {sample} at row {row} is zero: no cosine is defined.")
    return np.mean(np.einsum("lbi,bi->lb", a, b) / (na * nb), axis=1)


def crossing_time(t, curve, tau: float) -> Crossing:
    r"""$t_m(\tau) = \max\{t : \mathrm{Cos}_m(t) \ge \tau\}$ (eq 99), on the logged steps (no interpolation).

    Any order of `t`; a non-monotone curve gives the largest `t` at which it is at or above
    `tau`, whatever it does later. `tau` in (0, 1).
    """
    tau = check_level(tau, "tau")
    t, c = _curve(t, curve, "curve")
    above = np.flatnonzero(c >= tau)
    if len(above) == 0:
        return Crossing(math.nan, "never_reached")
    if above[-1] == len(t) - 1:
        return Crossing(math.nan, "from_start", float(t[-1]))
    return Crossing(float(t[above[-1]]), "crossed")


def sync_gaps(t, cos_u, cos_v, taus=(0.90, 0.95, 0.98)) -> dict:
    r"""$\Delta t(\tau) = t_v(\tau) - t_u(\tau)$ (eq 100) for each `tau`: negative when u stabilises first.

    Returns `{tau: {"gap", "t_u", "t_v"}}` with the two [`Crossing`][]s; `gap` is NaN unless both crossed.
    """
    taus = [check_level(x, "taus") for x in np.atleast_1d(taus)]
    if not taus:
        raise ValueError("`taus` must hold at least one threshold in (0, 1).")
    out = {}
    for tau in taus:
        cu, cv = crossing_time(t, cos_u, tau), crossing_time(t, cos_v, tau)
        out[tau] = {"gap": cv.time - cu.time if cu.found and cv.found else math.nan, "t_u": cu, "t_v": cv}
    return out


def ghosting_index(c_u, c_a, c_b) -> np.ndarray:
    r"""$GI(t) = 2 c_u(t) - c_A(t) - c_B(t)$ (eq 108) from the cosine-to-final curves of eq (107)."""
    c_u, c_a, c_b = (np.asarray(x, np.float64) for x in (c_u, c_a, c_b))
    if not (c_u.shape == c_a.shape == c_b.shape):
        raise ValueError(f"`c_u`, `c_a`, `c_b` must have one shape, got {c_u.shape}, {c_a.shape}, {c_b.shape}.")
    return 2 * c_u - c_a - c_b


def rms_change(a, b) -> float:
    """The root mean square of `a - b` over everything (e.g. the final u of a perturbed and an unperturbed run)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"the two outputs must have one shape, got {a.shape} and {b.shape}.")
    return float(np.sqrt(np.mean((a - b) ** 2)))


def agreement(labels_1, labels_2, z: float = 1.959963984540054) -> dict:
    r"""$\phi = P(\hat y^{(1)} = \hat y^{(2)})$ (eq 104) from paired labels, with its Wilson interval.

    Returns `{"phi", "lower", "upper", "agree", "n"}` (95% by default; `z` the normal quantile).
    """
    a, b = np.asarray(labels_1).ravel(), np.asarray(labels_2).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty label arrays of one size, got {np.shape(labels_1)} and {np.shape(labels_2)}.")
    k, n = int(np.sum(a == b)), int(a.size)
    lo, hi = wilson(k, n, z)
    return {"phi": k / n, "lower": lo, "upper": hi, "agree": k, "n": n}


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of `k` successes in `n` trials (95% by default), as floats."""
    if not (isinstance(n, int | np.integer) and n >= 1 and 0 <= k <= n):
        raise ValueError(f"need 0 <= k <= n and n >= 1 (integers), got k = {k!r}, n = {n!r}.")
    lo, hi = wilson_interval(k, n, z)
    return float(lo), float(hi)


def excess_agreement(phi, phi_indep):
    r"""$\phi^{ex} = (\phi - \phi^{indep}) / (1 - \phi^{indep})$ (eq 105): 0 for independent samples, 1 for identical.

    Increasing in $\phi$, so an interval's bounds map through it (the paper's recipe). `phi_indep`
    must be below 1 (two independent samples that always agree leave nothing to measure).
    """
    pi = float(phi_indep)
    if not (0 <= pi < 1):
        raise ValueError(f"`phi_indep` must lie in [0, 1), got {phi_indep!r}.")
    return (np.asarray(phi, np.float64) - pi) / (1 - pi)


def speciation_crossing(t_scan, phi_ex, phi_star: float = 0.55) -> Crossing:
    r"""$t^{spec}_m(\phi^\star) = \sup\{t \in \mathcal{T}_{scan} : \phi^{ex}_m(t) \ge \phi^\star\}$ (eq 106),
    interpolated linearly towards the next scan time (where the curve is below $\phi^\star$).

    `phi_star` in (0, 1). A curve that never reaches it, or that is above it at the largest scan
    time (the crossing lies beyond the scan), gives the corresponding status.
    """
    phi_star = check_level(phi_star, "phi_star")
    t, f = _curve(t_scan, phi_ex, "phi_ex")
    above = np.flatnonzero(f >= phi_star)
    if len(above) == 0:
        return Crossing(math.nan, "never_reached")
    j = above[-1]
    if j == len(t) - 1:
        return Crossing(math.nan, "from_start", float(t[-1]))
    return Crossing(float(t[j] + (f[j] - phi_star) / (f[j] - f[j + 1]) * (t[j + 1] - t[j])), "crossed")
