r"""Learned coupling schedules for the Appendix C task, judged on fresh samples.

For each angle $\theta$:

1. on a validation set of trials, run the uncoupled baseline and every constant / late /
   early schedule of the Appendix C grid (common random numbers: all differences are
   paired) and pick the grid schedule of best accuracy;
2. learn a piecewise-linear $g(t)$ from $g = 0$ with [`optimize_schedule`][] on
   [`alignment_objective`][] (cross-entropy of the posterior agreement plus `nll_weight`
   times the NLL), fresh trials every step; where no grid schedule improves accuracy
   (aligned modalities) the paired NLL increase over the baseline is also held to 0
   (`nll_budget=0`): where coupling cannot help, do no harm;
3. on a larger test set, drawn from keys used nowhere else, compare the learned schedule
   with that best grid schedule and with the baseline, again paired.

The verdicts are stated as tests on those paired differences (two standard errors), not
as point estimates: `beats_best` (accuracy higher and NLL not higher than the best grid
schedule's) and `no_harm` (accuracy not lower and NLL not higher than the baseline's).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..optimize import alignment_objective, optimize_schedule
from ..sampling.trials import ConditionalTrials, compare_schedules, evaluate_trials, paired_difference, summarize
from ..schedules import Constant, Early, Late, PiecewiseLinear

KNOTS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.0)


def grid_schedules(g0s=(0.2, 0.5, 1.0), t0: float = 1.0, dtype=jnp.float32) -> dict:
    """The Appendix C comparison set: constant, late and early (eq 144) at each `g0`."""
    out = {}
    for g0 in g0s:
        g, s = jnp.asarray(g0, dtype), jnp.asarray(t0, dtype)
        out |= {f"const/g0={g0}": Constant(g), f"late/g0={g0}": Late(g, s), f"early/g0={g0}": Early(g, s)}
    return out


def schedule_experiment(
    *,
    thetas=(3 * np.pi / 4, 0.0),
    steps: int = 150,
    n_train: int = 256,
    n_val: int = 4000,
    n_test: int = 16000,
    nll_weight: float = 0.06,
    surrogate: str = "cross_entropy",
    sharpness: float = 1.0,
    penalty: float = 100.0,
    learning_rate: float = 0.1,
    knots=KNOTS,
    g0s=(0.2, 0.5, 1.0),
    dim: int = 32,
    m2: float = 0.1,
    n_steps: int = 800,
    key=None,
    progress: bool = True,
    on_theta: Callable | None = None,
) -> dict:
    r"""Learn a schedule per angle and compare it with the Appendix C grid on fresh samples.

    The test set is drawn in chunks of `n_val` trials (memory) from keys used nowhere else.

    **Returns:** a dict with `params` and, per angle, `theta`, the learned `knots` and
    `values`, the optimisation `history`, `validation` (paired differences of every
    schedule from the baseline, see [`compare_schedules`][]), `best` (the grid schedule
    of highest validation accuracy), `test` (`baseline` summary, `learned` and `best`
    minus baseline, `vs_best` learned minus best, all paired) and the verdicts
    `beats_best` and `no_harm`, both judged on the test set.
    """
    key = jax.random.key(0) if key is None else key
    t_max = 2.0
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"`learning_rate` must be a finite number > 0 (a negative rate would ascend the objective), "
                         f"got {learning_rate!r}.")
    for name, n in (("steps", steps), ("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("n_steps", n_steps)):
        if not (isinstance(n, int | np.integer) and not isinstance(n, bool) and n >= 1):
            raise ValueError(f"`{name}` must be a positive integer, got {n!r}.")
    if knots[0] != 0.0 or knots[-1] != t_max:
        raise ValueError(f"`knots` must start at 0 and end at T = {t_max}, got {knots}.")
    trial_kw = dict(dim=dim, m2=m2, n_steps=n_steps, t_max=t_max)
    out = {"params": dict(steps=steps, n_train=n_train, n_val=n_val, n_test=n_test, nll_weight=nll_weight, penalty=penalty,
                          surrogate=surrogate, sharpness=sharpness, learning_rate=learning_rate,
                          knots=list(knots), g0s=list(g0s), dim=dim, m2=m2, n_steps=n_steps, t0=1.0), "runs": []}
    for j, theta in enumerate(thetas):
        k_train, k_val, k_test = jax.random.split(jax.random.fold_in(key, j), 3)
        grid = grid_schedules(g0s)
        val = ConditionalTrials.draw(k_val, float(theta), n_trials=n_val, **trial_kw)
        table = compare_schedules(grid, val)
        best = max(grid, key=lambda name: table[name]["d_acc"])
        # where no grid schedule helps accuracy (aligned modalities) the learned one may not
        # raise the NLL at all: do no harm; elsewhere the NLL weight alone sets the trade-off
        helps = table[best]["d_acc"] > 0
        budget = None if helps else 0.0
        init = PiecewiseLinear(knots, jnp.zeros(len(knots), jnp.float32))
        opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1))
        objective = alignment_objective(float(theta), nll_weight=nll_weight, surrogate=surrogate, sharpness=sharpness,
                                        nll_budget=budget,
                                        penalty=penalty, n_trials=n_train, **trial_kw)
        res = optimize_schedule(objective, init, optimizer=opt, steps=steps, key=k_train, progress=progress)
        table |= compare_schedules({"learned": res.schedule}, val)
        per_trial = {"baseline": [], "learned": [], "best": []}
        for c in range(-(-n_test // n_val)):
            test = ConditionalTrials.draw(jax.random.fold_in(k_test, c), float(theta), n_trials=min(n_val, n_test - c * n_val),
                                          **trial_kw)
            for name, s in (("baseline", Constant(jnp.zeros((), jnp.float32))), ("learned", res.schedule), ("best", grid[best])):
                per_trial[name].append(evaluate_trials(s, test))
        m = {name: {k: np.concatenate([r[k] for r in rows]) for k in rows[0]} for name, rows in per_trial.items()}
        tested = {
            "baseline": summarize(m["baseline"]),
            "learned": paired_difference(m["learned"], m["baseline"]),
            "best": paired_difference(m["best"], m["baseline"]),
            "vs_best": paired_difference(m["learned"], m["best"]),
        }
        vs, learned = tested["vs_best"], tested["learned"]
        run = {
            "theta": float(theta),
            "knots": list(knots),
            "values": np.asarray(res.schedule.values, np.float64).tolist(),
            "history": {k: np.asarray(v).tolist() for k, v in res.history.items()},
            "validation": table,
            "best": best,
            "nll_budget": budget,
            "test": tested,
            "beats_best": bool(vs["d_acc"] > 2 * vs["se_acc"] and vs["d_nll"] < 2 * vs["se_nll"]),
            "no_harm": bool(learned["d_acc"] > -2 * learned["se_acc"] and learned["d_nll"] < 2 * learned["se_nll"]),
        }
        out["runs"].append(run)
        if on_theta is not None:
            on_theta(run)
    return out
