r"""The conditional-coupling experiment of Appendix C (Figures 12-14).

For each angle $\theta$ between the class means of the source $X$ and the target $Y$, and
for each coupling schedule (constant, late, early, eq 144) and strength $g_0$: the alignment
accuracy, MSE (eq 145) and NLL (eq 146) of $Y$ generated given $X$'s forward path, as paired
differences from the uncoupled baseline $g_0 = 0$ on the same trials (the task, the exact
sampler and the statistics are in `sampling/trials.py`).

The paper does not state the mean amplitude $m$ or the switch time $t_0$; defaults
here are $m^2 = 0.1$ (so that accuracies are not saturated at $d = 32$) and
$t_0 = T/2$. Both are arguments.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..sampling.trials import ConditionalTrials, paired_difference, summarize, trial_metrics
from ..schedules import Constant, Early, Late

SCHEDULES = {"const": lambda g0, t0: Constant(g0), "late": lambda g0, t0: Late(g0, t0), "early": lambda g0, t0: Early(g0, t0)}


@eqx.filter_jit
def _reverse_y(make_schedule: Callable, g0s, t0, trials: ConditionalTrials):
    """Per-trial metrics for a batch of coupling strengths `g0s` (vmapped)."""
    m = jax.vmap(lambda g0: trial_metrics(make_schedule(g0, t0), trials))(g0s)
    return {k: m[k] for k in ("acc", "mse", "nll")}


def conditional_experiment(
    *,
    dim: int = 32,
    beta: float = 1.0,
    sigma_w2: float = 2.0,
    t_max: float = 2.0,
    n_steps: int = 800,
    n_trials: int = 2000,
    thetas=None,
    g0s=(0.2, 0.5, 1.0),
    schedules=("const", "late", "early"),
    m2: float = 0.1,
    t0: float | None = None,
    increments: str = "gaussian",
    key=None,
    progress: Callable | None = None,
) -> dict:
    r"""Run Appendix C: metrics vs $\theta$ for each schedule and $g_0$, as differences from $g_0 = 0$.

    **Returns:** a dict of plain arrays: `theta`; `baseline` (absolute accuracy, MSE and NLL
    at $g_0 = 0$ with standard errors); and for each schedule and $g_0$ the differences
    `d_acc`, `d_mse`, `d_nll` with their standard errors `se_*` (paired, see the module
    docstring); plus `params`.
    """
    for name in schedules:
        if name not in SCHEDULES:
            raise ValueError(f"Unknown schedule {name!r}; choose from {tuple(SCHEDULES)}.")
    if not (isinstance(n_trials, int) and n_trials >= 2):
        raise ValueError(f"`n_trials` must be an integer >= 2, got {n_trials!r}.")
    thetas = np.linspace(0.0, np.pi, 13) if thetas is None else np.atleast_1d(np.asarray(thetas, float))
    t0 = 0.5 * t_max if t0 is None else t0
    key = jax.random.key(0) if key is None else key
    dtype = jnp.float32
    g_all = jnp.asarray((0.0,) + tuple(g0s), dtype)  # the baseline first
    out = {"theta": thetas, "baseline": {}, "params": dict(dim=dim, beta=beta, sigma_w2=sigma_w2, t_max=t_max, n_steps=n_steps,
                                                           n_trials=n_trials, m2=m2, t0=t0, g0s=list(g0s), increments=increments)}
    rows = {(s, g): {m: [] for m in ("d_acc", "se_acc", "d_mse", "se_mse", "d_nll", "se_nll")} for s in schedules for g in g0s}
    base = {m: [] for m in ("acc", "se_acc", "mse", "se_mse", "nll", "se_nll")}
    for j, theta in enumerate(thetas):
        trials = ConditionalTrials.draw(jax.random.fold_in(key, j), float(theta), dim=dim, m2=m2, n_trials=n_trials,
                                        beta=beta, sigma_w2=sigma_w2, t_max=t_max, n_steps=n_steps,
                                        increments=increments, dtype=dtype)
        first = True
        for name in schedules:
            got = {m: np.asarray(v, np.float64) for m, v in _reverse_y(SCHEDULES[name], g_all, jnp.asarray(t0, dtype),
                                                                       trials).items()}
            ref = {m: v[0] for m, v in got.items()}  # row 0 is the baseline g0 = 0
            if first:
                for m, v in summarize(ref).items():
                    base[m].append(v)
                first = False
            for i, g in enumerate(g0s, start=1):
                for m, v in paired_difference({m: v[i] for m, v in got.items()}, ref).items():
                    rows[(name, g)][m].append(v)
        if progress is not None:
            progress(j + 1, len(thetas))
    out["baseline"] = {m: np.asarray(v) for m, v in base.items()}
    out["runs"] = {f"{s}/g0={g}": {m: np.asarray(v) for m, v in r.items()} for (s, g), r in rows.items()}
    return out
