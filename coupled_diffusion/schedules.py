r"""Coupling schedules $g(t)$: PyTree callables accepted wherever a constant $g$ is.

Pass one as `g` to [`CoupledOU.symmetric`][] or [`CoupledOU.anisotropic`][]; the process
then has a time-dependent $M(t)$, whose moments come from the ODEs of
[`MomentPath`][]. The three schedules of Appendix C (eq 144) are here; time is the
forward time $t \in [0, T]$.

A step has a `width`: `None` (default) is the exact indicator of eq (144), and the
schedule declares its discontinuity in `jump_ts` so the moment ODE solver steps onto it;
a positive width replaces the step by a logistic of that width, which is smooth, so
gradients with respect to `t0` exist.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from ._checks import as_float, check_finite, concrete


def _scalar(v, name):
    v = as_float(v, name)
    if v.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {v.shape}.")
    check_finite(v, name)
    return v


def _width(width):
    if width is None:
        return None
    width = _scalar(width, "width")
    w = concrete(width)
    if w is not None and not w > 0:
        raise ValueError(f"`width` must be None (an exact step) or > 0, got {float(w)}.")
    return width


class Constant(eqx.Module):
    r"""$g(t) = g_0$ (eq 144, $g_{const}$)."""

    g0: jax.Array

    def __init__(self, g0):
        self.g0 = _scalar(g0, "g0")

    def __call__(self, t):
        return self.g0 + jnp.zeros_like(jnp.asarray(t, self.g0.dtype))


class _Step(eqx.Module):
    g0: jax.Array
    t0: jax.Array
    width: jax.Array | None

    def __init__(self, g0, t0, width=None):
        self.g0 = _scalar(g0, "g0")
        self.t0 = _scalar(t0, "t0")
        tt = concrete(self.t0)
        if tt is not None and tt < 0:
            raise ValueError(f"`t0` must be >= 0 (a forward time), got {float(tt)}.")
        self.width = _width(width)

    def _on(self, t, sign):
        # indicator of sign * (t0 - t) >= 0, or its logistic relaxation
        t = jnp.asarray(t, jnp.result_type(self.g0, t))
        if self.width is None:
            return jnp.where(sign * (self.t0 - t) >= 0, 1.0, 0.0).astype(t.dtype)
        return jax.nn.sigmoid(sign * (self.t0 - t) / self.width)


class Late(_Step):
    r"""Coupling only near the data: $g(t) = g_0 \mathbf{1}\{t \le t_0\}$ (eq 144, $g_{late}$).

    "Late" refers to the generation (reverse) process, which meets small $t$ last.
    """

    def __call__(self, t):
        return self.g0 * self._on(t, 1.0)

    @property
    def jump_ts(self):
        return self.t0 if self.width is None else None


class Early(_Step):
    r"""Coupling only near the noise: $g(t) = g_0 \mathbf{1}\{t \ge t_0\}$ (eq 144, $g_{early}$)."""

    def __call__(self, t):
        return self.g0 * self._on(t, -1.0)

    @property
    def jump_ts(self):
        return self.t0 if self.width is None else None
