r"""Forward and reverse SDEs and the probability-flow ODE, integrated with diffrax.

The reverse process (eq 10) runs in the reverse time $s = T - t$:
$dZ = \big(-M(t) Z + \sigma_W^2 \nabla \log p_t(Z)\big) ds + \sigma_W d\tilde W(s)$, and the
probability-flow ODE is $dZ/ds = -M(t) Z + \frac{\sigma_W^2}{2} \nabla \log p_t(Z)$.

**How the diffrax overheads are removed.** A whole batch of trajectories is *one*
state of shape `(batch, k, d)` (never a `vmap` of `diffeqsolve` over samples); steps are
`diffrax.StepTo` on a fixed grid (exact step boundaries, so saved states at branch times
are grid states, not interpolations); and the noise is a [`GridBrownianPath`][], a
diffrax `AbstractBrownianPath` that draws the whole batch's increment for step $i$
from `fold_in(key, i)` in one call. diffrax's `VirtualBrownianTree` (a tree descent
per step, the reported source of large SDE slowdowns) and its `UnsafeBrownianPath`
(which keys on the bit pattern of the times) are avoided; keying on the step index
also makes cloning exact: clones share a trajectory's past and draw their own future.
The diffusion is `ControlTerm` with a lineax scaled identity, so no `(kd) x (kd)`
matrix exists.

**Increments.** `"gaussian"` (default) draws $N(0, \Delta s)$. `"rademacher"` draws
$\pm\sqrt{\Delta s}$ with probability 1/2 each (32 signs from one 32-bit random word):
Euler-Maruyama keeps its weak order 1 (the increments match the Gaussian's first three
moments), so distributions, cloning curves and expectations agree with the Gaussian
sampler within Monte Carlo error, at a fraction of the cost of drawing normals.
Individual paths are not Brownian: do not use it for strong (pathwise) questions.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from .._checks import concrete
from ..theory.moments import MomentPath

INCREMENTS = ("gaussian", "rademacher")
SOLVERS = ("euler", "heun", "shark")


class GridBrownianPath(diffrax.AbstractBrownianPath):
    r"""Brownian increments on a uniform grid, one key per step (see the module docstring).

    `evaluate(t0, t1)` returns the increment over the grid step starting at `t0`
    (index $i = \mathrm{round}((t_0 - \text{start}) / \text{dt})$), drawn from
    `fold_in(key, i)` and scaled by $\sqrt{t_1 - t_0}$. Use it with steps on that grid.
    With `levy_area=diffrax.SpaceTimeLevyArea` it also returns the space-time Lévy area
    $H \sim N(0, \Delta t / 12)$ needed by additive-noise Runge-Kutta solvers (ShARK).
    """

    shape: tuple = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)
    key: jax.Array
    start: jax.Array
    dt: jax.Array
    increments: str = eqx.field(static=True)
    levy_area: type = eqx.field(static=True)

    def __init__(self, shape, key, *, start, dt, dtype=jnp.float32, increments="gaussian", levy_area=diffrax.BrownianIncrement):
        if increments not in INCREMENTS:
            raise ValueError(f"`increments` must be one of {INCREMENTS}, got {increments!r}.")
        if increments == "rademacher" and levy_area is not diffrax.BrownianIncrement:
            raise ValueError("Rademacher increments carry no Levy area: use them with Euler-Maruyama only.")
        self.shape, self.dtype, self.key = tuple(shape), jnp.dtype(dtype), key
        self.start, self.dt = jnp.asarray(start), jnp.asarray(dt)
        self.increments, self.levy_area = increments, levy_area

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        del left
        if t1 is None:
            raise ValueError("GridBrownianPath gives increments over a step; call evaluate(t0, t1).")
        h = jnp.asarray(t1 - t0, self.dtype)
        index = jnp.round((t0 - self.start) / self.dt).astype(jnp.int32)
        key = jax.random.fold_in(self.key, index)
        W = jnp.sqrt(h) * _unit_increments(key, self.shape, self.dtype, self.increments)
        if not use_levy:
            return W
        if self.levy_area is diffrax.SpaceTimeLevyArea:
            H = jnp.sqrt(h / 12) * jax.random.normal(jax.random.fold_in(key, 1), self.shape, self.dtype)
            return diffrax.SpaceTimeLevyArea(dt=h, W=W, H=H)
        return diffrax.BrownianIncrement(dt=h, W=W)


class TabulatedBrownianPath(diffrax.AbstractBrownianPath):
    r"""Brownian increments read from a table of unit draws `table[i]` for grid step $i$.

    For common random numbers: several solves (e.g. coupling schedules compared with a
    baseline) read the same table, so their differences carry no noise-to-noise
    variance. `evaluate(t0, t1)` returns $\sqrt{t_1 - t_0}$ `table[i]` with
    $i = \mathrm{round}((t_0 - \text{start}) / \text{dt})$.
    """

    table: jax.Array
    start: jax.Array
    dt: jax.Array
    levy_area: type = eqx.field(static=True, default=diffrax.BrownianIncrement)

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        del left
        if t1 is None:
            raise ValueError("TabulatedBrownianPath gives increments over a step; call evaluate(t0, t1).")
        h = jnp.asarray(t1 - t0, self.table.dtype)
        index = jnp.clip(jnp.round((t0 - self.start) / self.dt).astype(jnp.int32), 0, self.table.shape[0] - 1)
        W = jnp.sqrt(h) * self.table[index]
        return diffrax.BrownianIncrement(dt=h, W=W) if use_levy else W


def unit_increments(key, shape, dtype=jnp.float32, kind: str = "gaussian"):
    """Unit-variance increments of the given kind (`"gaussian"` or `"rademacher"`)."""
    if kind not in INCREMENTS:
        raise ValueError(f"`increments` must be one of {INCREMENTS}, got {kind!r}.")
    return _unit_increments(key, tuple(shape), jnp.dtype(dtype), kind)


def _unit_increments(key, shape, dtype, kind):
    if kind == "gaussian":
        return jax.random.normal(key, shape, dtype)
    # 32 fair signs per 32-bit word
    n = 1
    for s in shape:
        n *= s
    words = jax.random.bits(key, (-(-n // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (2.0 * bits.reshape(-1)[:n].astype(dtype) - 1.0).reshape(shape)


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


def _grid(t_start, t_end, n_steps, dtype):
    if not (isinstance(n_steps, int) and n_steps >= 1):
        raise ValueError(f"`n_steps` must be a positive integer, got {n_steps!r}.")
    a, b = concrete(jnp.asarray(t_start)), concrete(jnp.asarray(t_end))
    if a is not None and b is not None and not (0 <= b < a and np.isfinite(a)):
        raise ValueError(f"Need 0 <= t_end < t_start < inf (forward times; the sampler runs from t_start down to t_end), "
                         f"got t_start={float(a)}, t_end={float(b)}.")
    return jnp.linspace(jnp.asarray(0.0, dtype), jnp.asarray(t_start - t_end, dtype), n_steps + 1)


def _drift_M(ou, t, dtype):
    return ou.drift_matrix(t).astype(dtype)


def _sde_terms(drift, sigma, shape, key, grid, dtype, increments, solver):
    levy = diffrax.SpaceTimeLevyArea if isinstance(solver, diffrax.ShARK | diffrax.SRA1 | diffrax.SEA) else diffrax.BrownianIncrement
    bm = GridBrownianPath(shape, key, start=grid[0], dt=grid[1] - grid[0], dtype=dtype, increments=increments, levy_area=levy)
    structure = jax.ShapeDtypeStruct(shape, dtype)
    diffusion = diffrax.ControlTerm(lambda s, z, args: sigma * lx.IdentityLinearOperator(structure), bm)
    return diffrax.MultiTerm(diffrax.ODETerm(drift), diffusion)


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
    z = jnp.asarray(z)
    dtype = z.dtype
    grid = _grid(t_start, t_end, n_steps, dtype)
    t_top = jnp.asarray(t_start, dtype)
    sigma = jnp.sqrt(jnp.asarray(ou.sigma_w2, dtype))
    sw2 = sigma**2
    solver = _solver(solver)
    score = _tabulated(score, t_top - grid, solver)

    def drift(s, zz, args):
        t = t_top - s
        return -jnp.einsum("ij,...jd->...id", _drift_M(ou, t, dtype), zz) + sw2 * score(t, zz)

    terms = _sde_terms(drift, sigma, z.shape, key, grid, dtype, increments, solver)
    if save_at is None:
        saveat = diffrax.SaveAt(t1=True)
    else:
        saveat = diffrax.SaveAt(ts=t_top - jnp.asarray(save_at, dtype), t1=True)
    sol = diffrax.diffeqsolve(
        terms, solver, grid[0], grid[-1], None, z,
        stepsize_controller=diffrax.StepTo(ts=grid), saveat=saveat, max_steps=n_steps,
    )
    if save_at is None:
        return sol.ys[-1]
    return sol.ys[:-1], sol.ys[-1]


def forward_sde(ou, z0, *, key, t_end, n_steps: int, increments: str = "gaussian", solver="euler"):
    r"""Euler-Maruyama (or another diffrax solver) for the forward SDE $dZ = M(t) Z dt + \sigma_W dW$ on $[0, t_{end}]$.

    For Monte Carlo checks of the moments; exact-in-law sampling at a fixed time is
    [`sample_marginal`][].
    """
    z0 = jnp.asarray(z0)
    dtype = z0.dtype
    grid = _grid(t_end, 0.0, n_steps, dtype)
    sigma = jnp.sqrt(jnp.asarray(ou.sigma_w2, dtype))

    def drift(t, zz, args):
        return jnp.einsum("ij,...jd->...id", _drift_M(ou, t, dtype), zz)

    solver = _solver(solver)
    terms = _sde_terms(drift, sigma, z0.shape, key, grid, dtype, increments, solver)
    sol = diffrax.diffeqsolve(
        terms, solver, grid[0], grid[-1], None, z0,
        stepsize_controller=diffrax.StepTo(ts=grid), saveat=diffrax.SaveAt(t1=True), max_steps=n_steps,
    )
    return sol.ys[-1]


def probability_flow(
    ou, score, z, *, t_start, t_end=0.0, solver=None, rtol: float = 1e-5, atol: float = 1e-5, n_steps: int | None = None,
    max_steps: int = 4096,
):
    r"""Integrate the probability-flow ODE from `t_start` down to `t_end` with diffrax.

    Adaptive by default (`Tsit5` with a PID controller at `rtol`/`atol`); pass
    `n_steps` for fixed uniform steps instead (then `solver` defaults to `Heun`).
    Deterministic: the randomness is in the initial states `z`.
    """
    z = jnp.asarray(z)
    dtype = z.dtype
    t_top = jnp.asarray(t_start, dtype)
    half_sw2 = 0.5 * jnp.asarray(ou.sigma_w2, dtype)

    def drift(s, zz, args):
        t = t_top - s
        return -jnp.einsum("ij,...jd->...id", _drift_M(ou, t, dtype), zz) + half_sw2 * score(t, zz)

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
        M = _drift_M(ou, t, dtype)
        my = M[target, target] * yy + jnp.einsum("j,...jd->...d", M[target, jnp.array(rest)], x)
        return -my + sigma**2 * score(t, yy, x)

    if noise is None:
        bm = GridBrownianPath(y.shape, key, start=grid[0], dt=dt, dtype=dtype, increments=increments)
    else:
        bm = TabulatedBrownianPath(jnp.asarray(noise, dtype), grid[0], dt)
    structure = jax.ShapeDtypeStruct(y.shape, dtype)
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(drift), diffrax.ControlTerm(lambda s, z, args: sigma * lx.IdentityLinearOperator(structure), bm)
    )
    sol = diffrax.diffeqsolve(
        terms, diffrax.Euler(), grid[0], grid[-1], None, y,
        stepsize_controller=diffrax.StepTo(ts=grid), saveat=diffrax.SaveAt(t1=True), max_steps=n_steps,
    )
    return sol.ys[-1]
