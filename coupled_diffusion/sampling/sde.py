r"""Forward and reverse SDEs and the probability-flow ODE, integrated with diffrax.

The reverse process (eq 10) runs in the reverse time $s = T - t$:
$dZ = \big(-M(t) Z + \sigma_W^2 \nabla \log p_t(Z)\big) ds + \sigma_W d\tilde W(s)$, and the
probability-flow ODE is $dZ/ds = -M(t) Z + \frac{\sigma_W^2}{2} \nabla \log p_t(Z)$.

**How the diffrax overheads are removed.** A whole batch of trajectories is *one*
state of shape `(batch, k, d)` (never a `vmap` of `diffeqsolve` over samples); steps are
`diffrax.StepTo` on a fixed grid (exact step boundaries, so saved states at branch times
are grid states, not interpolations); and the noise is a [`GridBrownianPath`][]
(`brownian.py`), which draws the whole batch's increment for step $i$ from
`fold_in(key, i)` in one call. The diffusion is `ControlTerm` with a lineax scaled
identity, so no `(kd) x (kd)` matrix exists.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from .._checks import concrete
from .._linalg import kron_apply
from ..theory.moments import MomentPath
from .brownian import GridBrownianPath, TabulatedBrownianPath

SOLVERS = ("euler", "heun", "shark")


def _solver(solver):
    if isinstance(solver, diffrax.AbstractSolver):
        return solver
    if solver == "euler":
        return diffrax.Euler()
    if solver == "heun":
        return diffrax.Heun()
    if solver == "shark":
        return diffrax.ShARK()
    raise ValueError(f"`solver` must be one of {SOLVERS} or a diffrax solver, got {solver!r}.")


def _tabulated(score, times, solver):
    """For solvers that evaluate the drift at grid times only, look the score's moments up in a table."""
    if isinstance(solver, diffrax.Euler | diffrax.Heun) and isinstance(getattr(score, "path", None), MomentPath):
        return eqx.tree_at(lambda s: s.path, score, score.path.tabulate(times))
    return score


def _state(ou, z, name: str = "z"):
    """`z` as an array of states `(..., k, d)`, checked: k must be the process's, and concrete values finite."""
    z = jnp.asarray(z)
    if z.ndim < 2 or z.shape[-2] != ou.k:
        raise ValueError(f"`{name}` must hold states of shape (..., k, d) with k = {ou.k} modalities, got shape {z.shape}.")
    v = concrete(z)
    if v is not None and not np.all(np.isfinite(v)):
        bad = ~np.isfinite(v)
        first = np.unravel_index(int(np.flatnonzero(bad)[0]), v.shape)
        raise ValueError(f"`{name}` holds {int(bad.sum())} non-finite entries (the first at index {tuple(int(i) for i in first)}).")
    return z


def _check_save_at(save_at, t_start, t_end, n_steps) -> None:
    """Concrete `save_at` times must be forward times on the sampler's grid."""
    ts, a, b = concrete(jnp.asarray(save_at)), concrete(jnp.asarray(t_start)), concrete(jnp.asarray(t_end))
    if ts is None or a is None or b is None:
        return
    eps = np.finfo(ts.dtype).eps if np.issubdtype(ts.dtype, np.floating) else 0.0
    ts = np.asarray(ts, float).reshape(-1)
    h = (float(a) - float(b)) / n_steps
    index = (float(a) - ts) / h
    slack = 1e-6 + 4 * eps * (abs(float(a)) + np.abs(ts)) / h  # float32 times carry their own rounding
    off = ~np.isfinite(ts) | (ts < float(b) - 1e-9 * h) | (ts > float(a) + 1e-9 * h) | (np.abs(index - np.round(index)) > slack)
    if off.any():
        raise ValueError(f"`save_at` times must lie on the sampler's grid t_start - i (t_start - t_end) / n_steps (step {h:g} from "
                         f"{float(a):g} down to {float(b):g}); {ts[off][:8].tolist()} do not.")


def _grid(t_start, t_end, n_steps, dtype):
    if not (isinstance(n_steps, int | np.integer) and not isinstance(n_steps, bool) and n_steps >= 1):
        raise ValueError(f"`n_steps` must be a positive integer, got {n_steps!r}.")
    n_steps = int(n_steps)
    a, b = concrete(jnp.asarray(t_start)), concrete(jnp.asarray(t_end))
    if a is not None and b is not None and not (0 <= b < a and np.isfinite(a)):
        raise ValueError(f"Need 0 <= t_end < t_start < inf (forward times; the sampler runs from t_start down to t_end), "
                         f"got t_start={float(a)}, t_end={float(b)}.")
    return jnp.linspace(jnp.asarray(0.0, dtype), jnp.asarray(t_start - t_end, dtype), n_steps + 1)


def _grid_path(shape, key, grid, dtype, increments, solver):
    """The Brownian path of a fixed-step solve on `grid` (with the Lévy area the solver needs)."""
    levy = diffrax.SpaceTimeLevyArea if isinstance(solver, diffrax.ShARK | diffrax.SRA1 | diffrax.SEA) else diffrax.BrownianIncrement
    return GridBrownianPath(shape, key, start=grid[0], dt=grid[1] - grid[0], dtype=dtype, increments=increments, levy_area=levy)


def _terms(drift, sigma, path, shape, dtype):
    """Drift plus additive noise $\sigma\,dW$, the diffusion a lineax scaled identity (no $(kd)^2$ matrix)."""
    structure = jax.ShapeDtypeStruct(shape, dtype)
    diffusion = diffrax.ControlTerm(lambda s, z, args: sigma * lx.IdentityLinearOperator(structure), path)
    return diffrax.MultiTerm(diffrax.ODETerm(drift), diffusion)


def _reverse_drift(ou, score, t_top, weight, dtype):
    r"""The reverse-time drift $-M(t) z + w \nabla \log p_t(z)$ at $t = t_{top} - s$.

    $w = \sigma_W^2$ for the reverse SDE, half that for the probability-flow ODE.
    """

    def drift(s, z, args):
        t = t_top - s
        return -kron_apply(ou.drift_matrix(t).astype(dtype), z) + weight * score(t, z)

    return drift


def _fixed_steps(terms, solver, grid, z, saveat):
    return diffrax.diffeqsolve(terms, solver, grid[0], grid[-1], None, z, stepsize_controller=diffrax.StepTo(ts=grid),
                               saveat=saveat, max_steps=grid.shape[0] - 1)


def reverse_sde(
    ou,
    score,
    z,
    *,
    key,
    t_start,
    t_end=0.0,
    n_steps: int,
    solver="euler",
    increments: str = "gaussian",
    save_at=None,
):
    r"""Integrate the reverse SDE (eq 10) from forward time `t_start` down to `t_end`.

    **Arguments:**

    - `ou`: the forward process ([`CoupledOU`][], constant or time-dependent M).
    - `score`: a callable `score(t, z)` with the forward time `t` (e.g. a
        [`PopulationScore`][] or [`EmpiricalScore`][], or a learned model).
    - `z`: initial states at `t_start`, shape `(batch, k, d)` (any leading batch shape).
    - `key`: the noise key; the same key gives the same trajectories.
    - `t_start`, `t_end`: forward times, `t_start > t_end >= 0`.
    - `n_steps`: uniform steps between them.
    - `solver`: `"euler"` (Euler-Maruyama, default), `"heun"` (strong order 1 for this
        additive noise), `"shark"` (additive-noise SRK, strong order 1.5), or a diffrax solver.
        The last two evaluate the score at `t_end` itself: keep `t_end > 0` for an empirical score.
    - `increments`: `"gaussian"` or `"rademacher"` (weak order 1, Euler only).
    - `save_at`: optional forward times (on the grid) at which to also return the state.

    **Returns:** the states at `t_end`, or `(states at save_at, states at t_end)` when
    `save_at` is given (saved states stacked in front).
    """
    z = _state(ou, z)
    dtype = z.dtype
    grid = _grid(t_start, t_end, n_steps, dtype)
    if save_at is not None:
        _check_save_at(save_at, t_start, t_end, n_steps)
    t_top = jnp.asarray(t_start, dtype)
    sigma = jnp.sqrt(jnp.asarray(ou.sigma_w2, dtype))
    solver = _solver(solver)
    drift = _reverse_drift(ou, _tabulated(score, t_top - grid, solver), t_top, sigma**2, dtype)
    terms = _terms(drift, sigma, _grid_path(z.shape, key, grid, dtype, increments, solver), z.shape, dtype)
    if save_at is None:
        saveat = diffrax.SaveAt(t1=True)
    else:
        saveat = diffrax.SaveAt(ts=t_top - jnp.asarray(save_at, dtype), t1=True)
    sol = _fixed_steps(terms, solver, grid, z, saveat)
    if save_at is None:
        return sol.ys[-1]
    return sol.ys[:-1], sol.ys[-1]


def continue_reverse_sde(ou, score, z, *, key, t_from, t_max, dt, max_steps: int, solver="euler", increments: str = "gaussian"):
    r"""Continue reverse trajectories from forward time `t_from` down to 0 in steps of `dt`.

    The steps lie on the grid of a sampler started at `t_max` with step `dt` (reverse time
    $s = t_{max} - t$, step index $\mathrm{round}(s / dt)$), so states saved by
    [`reverse_sde`][] at grid times continue exactly as a longer run would, with fresh noise
    from `key`. `t_from` may be traced: one compilation serves every starting time (clones
    split off a master trajectory at many branch times); `max_steps` bounds the number of
    steps (e.g. `round(t_max / dt)`). Returns the states at $t = 0$.
    """
    z = _state(ou, z)
    dtype = z.dtype
    t_top = jnp.asarray(t_max, dtype)  # forward time t = t_max - s, so s = t_max is t = 0
    dt = jnp.asarray(dt, dtype)
    sigma = jnp.sqrt(jnp.asarray(ou.sigma_w2, dtype))
    solver = _solver(solver)
    grid = jnp.stack([jnp.zeros((), dtype), dt])
    terms = _terms(_reverse_drift(ou, score, t_top, sigma**2, dtype), sigma, _grid_path(z.shape, key, grid, dtype, increments, solver),
                   z.shape, dtype)
    sol = diffrax.diffeqsolve(terms, solver, t_top - jnp.asarray(t_from, dtype), t_top, dt, z,
                              stepsize_controller=diffrax.ConstantStepSize(), saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
    return sol.ys[-1]


def forward_sde(ou, z0, *, key, t_end, n_steps: int, increments: str = "gaussian", solver="euler"):
    r"""Euler-Maruyama (or another diffrax solver) for the forward SDE $dZ = M(t) Z dt + \sigma_W dW$ on $[0, t_{end}]$.

    For Monte Carlo checks of the moments; exact-in-law sampling at a fixed time is
    [`sample_marginal`][].
    """
    z0 = _state(ou, z0, "z0")
    dtype = z0.dtype
    grid = _grid(t_end, 0.0, n_steps, dtype)
    sigma = jnp.sqrt(jnp.asarray(ou.sigma_w2, dtype))
    solver = _solver(solver)
    drift = lambda t, z, args: kron_apply(ou.drift_matrix(t).astype(dtype), z)
    terms = _terms(drift, sigma, _grid_path(z0.shape, key, grid, dtype, increments, solver), z0.shape, dtype)
    return _fixed_steps(terms, solver, grid, z0, diffrax.SaveAt(t1=True)).ys[-1]


def probability_flow(
    ou, score, z, *, t_start, t_end=0.0, solver=None, rtol: float = 1e-5, atol: float = 1e-5, n_steps: int | None = None,
    max_steps: int = 4096,
):
    r"""Integrate the probability-flow ODE from `t_start` down to `t_end` with diffrax.

    Adaptive by default (`Tsit5` with a PID controller at `rtol`/`atol`); pass
    `n_steps` for fixed uniform steps instead (then `solver` defaults to `Heun`).
    Deterministic: the randomness is in the initial states `z`.
    """
    z = _state(ou, z)
    dtype = z.dtype
    t_top = jnp.asarray(t_start, dtype)
    drift = _reverse_drift(ou, score, t_top, 0.5 * jnp.asarray(ou.sigma_w2, dtype), dtype)
    s1 = jnp.asarray(t_start - t_end, dtype)
    if n_steps is None:
        solver = diffrax.Tsit5() if solver is None else solver
        controller, dt0 = diffrax.PIDController(rtol=rtol, atol=atol), s1 / 64
    else:
        solver = diffrax.Heun() if solver is None else solver
        grid = _grid(t_start, t_end, n_steps, dtype)
        controller, dt0 = diffrax.StepTo(ts=grid), None
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(drift), solver, jnp.zeros((), dtype), s1, dt0, z,
        stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True), max_steps=max_steps,
    )
    return sol.ys[-1]


def reverse_conditional(
    ou,
    score,
    y,
    x_path,
    *,
    t_start,
    n_steps: int,
    key=None,
    noise=None,
    increments: str = "gaussian",
):
    r"""Generate one modality given a forward path of the others: the reverse SDE of eq (143).

    In reverse time $s = T - t$: $dY = \big(-(M(t) z)_y + \sigma_W^2 \nabla_y \log P_t(Y|X_t)\big) ds
    + \sigma_W d\tilde W$, with $(Mz)_y = \sum_j M_{yj}(t) z_j$, Euler-Maruyama on `n_steps`
    uniform steps from `t_start` to 0.

    **Arguments:**

    - `ou`: the forward process (constant or time-dependent M).
    - `score`: a [`ConditionalScore`][] (or any `score(t, y, x)`); its `target` is $y$.
    - `y`: states at `t_start`, shape `(batch, d)`.
    - `x_path`: the other modalities on the forward grid $t_i = i\,T/N$, shape
        `(n_steps + 1, batch, k - 1, d)` (index 0 is $t = 0$).
    - `key` or `noise`: draw increments step by step from `key`, or read unit increments
        from the table `noise` of shape `(n_steps, batch, d)` (common random numbers,
        see [`TabulatedBrownianPath`][]).
    - `increments`: `"gaussian"` or `"rademacher"` (with `key`).

    **Returns:** $Y$ at $t = 0$, shape `(batch, d)`.
    """
    y = jnp.asarray(y)
    dtype = y.dtype
    if x_path.shape[0] != n_steps + 1:
        raise ValueError(f"`x_path` must hold n_steps + 1 = {n_steps + 1} grid states, got {x_path.shape[0]}.")
    if (key is None) == (noise is None):
        raise ValueError("Pass exactly one of `key` (fresh increments) or `noise` (a table of unit increments).")
    target = getattr(score, "target", ou.k - 1)
    rest = [j for j in range(ou.k) if j != target]
    grid = _grid(t_start, 0.0, n_steps, dtype)
    t_top = jnp.asarray(t_start, dtype)
    dt = grid[1] - grid[0]
    sigma = jnp.sqrt(jnp.asarray(ou.sigma_w2, dtype))
    score = _tabulated(score, t_top - grid, diffrax.Euler())

    def drift(s, yy, args):
        t = t_top - s
        i = jnp.clip(n_steps - jnp.round(s / dt).astype(jnp.int32), 0, n_steps)
        x = x_path[i]
        M = ou.drift_matrix(t).astype(dtype)
        my = M[target, target] * yy + jnp.einsum("j,...jd->...d", M[target, jnp.array(rest)], x)
        return -my + sigma**2 * score(t, yy, x)

    if noise is None:
        path = GridBrownianPath(y.shape, key, start=grid[0], dt=dt, dtype=dtype, increments=increments)
    else:
        path = TabulatedBrownianPath(jnp.asarray(noise, dtype), grid[0], dt)
    return _fixed_steps(_terms(drift, sigma, path, y.shape, dtype), diffrax.Euler(), grid, y, diffrax.SaveAt(t1=True)).ys[-1]
