"""Bracketing on a grid, then a bracketed Newton solve with optimistix.

The bracket is the last sign change of `F` on the grid (the first crossing met by a
reverse process running from t_max down to 0). Newton runs inside it with iterates
clipped to the bracket; optimistix's implicit adjoint makes the root differentiable
with respect to everything passed in `args` (the implicit function theorem), while the
grid search itself is discrete and carries no gradient.
"""

import jax
import jax.numpy as jnp
import optimistix as optx


def tolerances(dtype, rtol, atol):
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
