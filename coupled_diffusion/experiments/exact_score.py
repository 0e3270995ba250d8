r"""Theory against exact-score simulation: cloning vs speciation, memorisation vs collapse.

- [`cloning_vs_dim`][]: the single-modality setting of Biroli et al. (2024) ($k = 1$,
  $\beta = 1$, $\sigma_W^2 = 2$, $\sigma^2 = 1$, $m^2 = 1$, $T = 10$): measured clone
  agreement against the exact curve ([`clone_agreement_theory`][]), and its 0.75
  crossing against the finite-$d$ speciation time $d\,\kappa(t_S) = 1$ and against
  Biroli et al.'s $\frac12 \log d$.
- [`memorization_vs_collapse`][]: the crossing of 1/2 by the fraction of memorised
  samples against the REM collapse time with $\alpha = \log n / (k d)$.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..sampling.cloning import clone_agreement, clone_agreement_theory, last_crossing_time, memorization_curve
from ..sampling.draws import realize_means, sample_data
from ..theory.collapse import collapse_time
from ..theory.mixture import TwoClassMixture
from ..theory.ou import CoupledOU
from ..theory.speciation import speciation_time

K1 = dict(beta=1.0, sigma_w2=2.0, variance=1.0, m2=1.0)


def _k1():
    return CoupledOU(M=[[-K1["beta"]]], sigma_w2=K1["sigma_w2"]), TwoClassMixture([[K1["m2"]]], [K1["variance"]])


def cloning_vs_dim(
    dims=(64, 256, 1024),
    *,
    n_pairs: int = 1000,
    n_steps: int = 500,
    t_max: float = 10.0,
    t_branch=None,
    level: float = 0.75,
    increments: str = "gaussian",
    key=None,
    progress: Callable | None = None,
) -> dict:
    """Clone-agreement curves for several `dims`, with the exact curve and three predicted locations."""
    ou, data = _k1()
    key = jax.random.key(0) if key is None else key
    t_branch = np.linspace(0.5, 6.0, 23) if t_branch is None else np.asarray(t_branch, float)
    fine = np.linspace(0.01, t_max * 0.99, 4000)
    out = {"dims": list(dims), "level": level, "curves": {}, "params": dict(K1, t_max=t_max, n_pairs=n_pairs, n_steps=n_steps,
                                                                             increments=increments)}
    for i, d in enumerate(dims):
        c = clone_agreement(ou, data, t_branch, dim=int(d), n_pairs=n_pairs, n_steps=n_steps, t_max=t_max,
                            key=jax.random.fold_in(key, i), increments=increments)
        phi = np.asarray(clone_agreement_theory(ou, data, c.t_branch, dim=int(d)))
        t_s = speciation_time(ou, data, t_max=t_max, dim=int(d), throw=False)
        out["curves"][str(d)] = {
            "t_branch": np.asarray(c.t_branch), "agreement": np.asarray(c.agreement), "lower": np.asarray(c.lower),
            "upper": np.asarray(c.upper), "theory": phi,
            "crossing_measured": c.crossing(level),
            "crossing_exact_curve": last_crossing_time(fine, np.asarray(clone_agreement_theory(ou, data, fine, dim=int(d))), level),
            "t_s_kappa": float(t_s.value), "half_log_d": 0.5 * float(np.log(d)),
        }
        if progress is not None:
            progress(i + 1, len(dims))
    return out


def memorization_vs_collapse(
    cases=((8, 512), (16, 64), (16, 1024), (32, 1024), (32, 16384)),
    *,
    n_samples: int = 400,
    n_steps: int = 1000,
    t_max: float = 5.0,
    key=None,
    progress: Callable | None = None,
) -> dict:
    r"""Memorisation crossing vs the REM collapse time, for `(d, n)` pairs ($k = 1$)."""
    ou, data = _k1()
    key = jax.random.key(0) if key is None else key
    rows = []
    for i, (d, n) in enumerate(cases):
        kp, kr = jax.random.split(jax.random.fold_in(key, i))
        pts, _ = sample_data(kp, data, realize_means(data, int(d)), int(n))
        curve = memorization_curve(ou, pts.astype(jnp.float32), np.geomspace(0.005, 3.0, 32), n_samples=n_samples,
                                   n_steps=n_steps, t_max=t_max, key=kr)
        t_c = collapse_time(ou, data, alpha=float(np.log(n) / d), throw=False)
        rows.append({"d": int(d), "n": int(n), "alpha": float(np.log(n) / d), "t_measured": curve.crossing(0.5),
                     "t_collapse": float(t_c.value), "t": np.asarray(curve.t), "fraction": np.asarray(curve.fraction)})
        if progress is not None:
            progress(i + 1, len(cases))
    return {"cases": rows, "params": dict(K1, t_max=t_max, n_samples=n_samples, n_steps=n_steps)}
