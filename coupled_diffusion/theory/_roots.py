"""The theory solvers' shared root-finding pipeline: grid -> last crossing -> bracketed Newton -> result code.

A solver evaluates its residual `F` on a grid (positive on the "before" side, e.g.
$\\kappa - 1$ for speciation), takes the *last* sign change of `F` as the bracket (the first
crossing met by a reverse process running from $t_{max}$ down to 0), and refines it by a
bracketed Newton solve with optimistix, its iterates clipped to the bracket. optimistix's
implicit adjoint makes the root differentiable with respect to everything passed in `args`
(the implicit function theorem); the grid search itself is discrete and carries no gradient.
The result code is the first failed check, in a precedence order the solver states once
(`first_failure`), else the Newton solve's own code.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optimistix as optx

from .._results import RESULTS, first_failure


@dataclasses.dataclass(frozen=True)
class Options:
    """Bracketing-grid size and Newton settings of one solve (static: part of the compiled program).

    Build it with [`Options.of`][], which validates the values and fills the default
    tolerances for the working precision.
    """

    grid_size: int
    rtol: float
    atol: float
    max_steps: int

    @classmethod
    def of(cls, dtype, *, grid_size, rtol, atol, max_steps, min_grid_size: int = 1) -> "Options":
        if not (isinstance(grid_size, int) and grid_size >= min_grid_size):
            raise ValueError(f"`grid_size` must be an integer >= {min_grid_size}, got {grid_size!r}.")
        if not (isinstance(max_steps, int) and max_steps >= 1):
            raise ValueError(f"`max_steps` must be a positive integer, got {max_steps!r}.")
        rtol, atol = tolerances(dtype, rtol, atol)
        return cls(grid_size, float(rtol), float(atol), max_steps)


def tolerances(dtype, rtol, atol):
    """`(rtol, atol)`, each defaulting to 1e-12 in float64 and 1e-6 in float32."""
    eps_rtol = 1e-12 if jnp.finfo(dtype).bits == 64 else 1e-6
    return (eps_rtol if rtol is None else rtol), (eps_rtol if atol is None else atol)


def last_crossing(F):
    """Index `j` of the last grid point with `F[j] >= 0`, or -1 when there is none."""
    idx = jnp.arange(F.shape[0])
    return jnp.max(jnp.where(F >= 0, idx, -1))


def bracketed_newton(fn, args, lower, upper, f_lower, f_upper, ok, *, rtol, atol, max_steps):
    """Solve `fn(y, args) = 0` for `y` in `[lower, upper]`, where `f_lower >= 0 > f_upper`.

    Where `ok` is False the solve is replaced by a trivial one (so a batch of vmapped
    problems does not wait on meaningless iterations); the caller masks the value.
    Returns `(value, optimistix result)`.
    """
    lower, upper, f_lower, f_upper = (jax.lax.stop_gradient(x) for x in (lower, upper, f_lower, f_upper))
    width = upper - lower
    frac = jnp.where(ok, f_lower / jnp.where(ok, f_lower - f_upper, 1.0), 0.5)
    y0 = lower + jnp.clip(frac, 0.0, 1.0) * width

    def guarded(y, a):
        inner, ok_, y0_ = a
        return jnp.where(ok_, fn(y, inner), y - y0_)

    sol = optx.root_find(
        guarded,
        optx.Newton(rtol=rtol, atol=atol),
        y0,
        args=(args, ok, y0),
        options=dict(lower=lower, upper=upper),
        max_steps=max_steps,
        throw=False,
    )
    return sol.value, sol.result


def solve_last_crossing(
    residual: Callable,
    args,
    F,
    bracket: Callable,
    checks: Sequence[tuple],
    *,
    no_crossing: RESULTS,
    crossing_at_end: RESULTS,
    options: Options,
):
    """The whole pipeline: the root of `residual(y, args)` in the bracket of the last sign change of `F`.

    **Arguments:**

    - `residual`, `args`: the function whose root is sought, and its differentiable inputs.
    - `F`: the residual on the grid, shape `(n,)`.
    - `bracket`: `bracket(jc) -> (lower, upper)`, the interval in `y` between grid points `jc`
        and `jc + 1`.
    - `checks`: `(ok, code)` pairs that must hold besides the bracketing, highest precedence
        first (validity, stability, ...).
    - `no_crossing`: the code where `F < 0` on the whole grid.
    - `crossing_at_end`: the code where `F >= 0` at the last grid point (the crossing lies beyond it).
    - `options`: the [`Options`][] of the solve.

    **Returns:** `(value, jc, result)`: the root (meaningful only where `result` is successful),
    the index of the grid step that brackets it, and the result code.
    """
    n = F.shape[0]
    j = last_crossing(F)
    jc = jnp.clip(j, 0, n - 2)
    lower, upper = bracket(jc)
    checks = [*checks, (j >= 0, no_crossing), (j < n - 1, crossing_at_end)]
    ok = jnp.all(jnp.stack([jnp.asarray(c, bool) for c, _ in checks]))
    value, optx_result = bracketed_newton(
        residual, args, lower, upper, F[jc], F[jc + 1], ok, rtol=options.rtol, atol=options.atol, max_steps=options.max_steps
    )
    return value, jc, first_failure(checks, RESULTS.promote(optx_result))
