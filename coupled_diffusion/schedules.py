r"""Coupling schedules $g(t)$: PyTree callables accepted wherever a constant $g$ is.

Pass one as `g` to [`CoupledOU.symmetric`][] or [`CoupledOU.anisotropic`][]; the process
then has a time-dependent $M(t)$, whose moments come from the ODEs of [`MomentPath`][].
Time is the forward time $t \in [0, T]$. Every schedule is an `eqx.Module`: its array
fields are the learnable parameters (`jax.grad`, `optax` and `vmap` see them), the rest
is static.

- [`Constant`][], [`Late`][], [`Early`][]: eq (144). A step's `width` is `None` for the exact
  indicator (the schedule then declares its discontinuity in `jump_ts`, so the moment ODE
  solver steps onto it) or a positive number for a logistic relaxation of that width,
  which is smooth, so gradients with respect to `g0`, `t0` and `width` exist.
- [`PiecewiseLinear`][]: values at fixed knots, linear in between.
- [`MonotoneSpline`][]: a monotone cubic (Fritsch-Carlson) through knot values that are
  monotone by construction.
- Sums (`a + b`, [`Sum`][]), scaling (`c * s`) and [`Bounded`][] ($b \tanh(s/b)$).

**Constraints are part of the parametrisation.** With `bound=b`, [`PiecewiseLinear`][]
stores unconstrained parameters $\rho$ and uses $g = b \tanh\rho$, and [`MonotoneSpline`][]
keeps its knot values inside $(-b, b)$; so $|g(t)| < b$ for *every* $t$ and every parameter
value an optimiser can reach. For the symmetric M (eq 2) take $b < \beta$: stability
$\beta > |g(t)|$ then holds by construction.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

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


def _bound(bound):
    """A fixed (static) positive bound: constraints are not parameters."""
    if bound is None:
        return None
    b = float(bound)
    if not (b > 0 and np.isfinite(b)):
        raise ValueError(f"`bound` must be a finite number > 0, got {bound!r}.")
    return b


class Schedule(eqx.Module):
    """Base class: `schedule(t)` gives $g(t)$; supports `+` and scalar `*`."""

    def __call__(self, t):
        raise NotImplementedError

    @property
    def jump_ts(self):
        """Times where $g$ jumps (for the ODE step controller), or None."""
        return None

    def sup_abs(self):
        r"""$\sup_{t \ge 0} |g(t)|$ where the schedule knows it exactly (traceable), else None.

        The symmetric M of eq (2) needs $|g(t)| < \beta$ at every time; [`CoupledOU.symmetric`][]
        checks it with this value, and the solvers report `unstable` when it fails under `jit`.
        """
        return None

    def __add__(self, other):
        return Sum((self, other))

    def __mul__(self, c):
        return Scaled(self, as_float(c, "scale"))

    __rmul__ = __mul__


class Constant(Schedule):
    r"""$g(t) = g_0$ (eq 144, $g_{const}$)."""

    g0: jax.Array

    def __init__(self, g0):
        self.g0 = _scalar(g0, "g0")

    def __call__(self, t):
        return self.g0 + jnp.zeros_like(jnp.asarray(t, self.g0.dtype))

    def sup_abs(self):
        return jnp.abs(self.g0)


class _Step(Schedule):
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

    @property
    def jump_ts(self):
        return self.t0 if self.width is None else None


class Late(_Step):
    r"""Coupling only near the data: $g(t) = g_0 \mathbf{1}\{t \le t_0\}$ (eq 144, $g_{late}$).

    "Late" refers to the generation (reverse) process, which meets small $t$ last.
    """

    def __call__(self, t):
        return self.g0 * self._on(t, 1.0)

    def sup_abs(self):
        # on for t <= t0 (attained at t = 0); the logistic step is largest at t = 0
        return jnp.abs(self.g0) * (1.0 if self.width is None else jax.nn.sigmoid(self.t0 / self.width))


class Early(_Step):
    r"""Coupling only near the noise: $g(t) = g_0 \mathbf{1}\{t \ge t_0\}$ (eq 144, $g_{early}$)."""

    def __call__(self, t):
        return self.g0 * self._on(t, -1.0)

    def sup_abs(self):
        return jnp.abs(self.g0)  # approached as t grows, for the logistic step as well


def _knots(knots):
    """Fixed (static) knot times, as a tuple of floats."""
    k = np.asarray(knots, float)
    if k.ndim != 1 or k.shape[0] < 2:
        raise ValueError(f"`knots` must be a 1-D sequence of at least 2 times, got shape {k.shape}.")
    if not np.all(np.diff(k) > 0) or not np.all(np.isfinite(k)):
        raise ValueError(f"`knots` must be finite and strictly increasing, got {k.tolist()}.")
    return tuple(k.tolist())


class PiecewiseLinear(Schedule):
    r"""Linear interpolation of values at fixed `knots` (constant beyond the ends).

    Parameters are `raw`: the values themselves, or with `bound=b` the unconstrained
    $\rho_i$ with $g_i = b \tanh \rho_i$, so $|g(t)| < b$ everywhere (in floating point
    $\tanh$ saturates to 1 once $|\rho_i| \gtrsim 19$, and the interpolant is clipped so
    that $|g(t)| \le b$ holds exactly). Build it from the values with
    [`PiecewiseLinear.from_values`][].
    """

    knots: tuple = eqx.field(static=True)
    raw: jax.Array
    bound: float | None = eqx.field(static=True)

    def __init__(self, knots, raw, *, bound=None):
        self.knots = _knots(knots)
        self.raw = as_float(raw, "raw")
        if self.raw.shape != (len(self.knots),):
            raise ValueError(f"`raw` must have shape ({len(self.knots)},) like `knots`, got {self.raw.shape}.")
        check_finite(self.raw, "values" if bound is None else "raw")
        self.bound = _bound(bound)

    @classmethod
    def from_values(cls, knots, values, *, bound=None) -> "PiecewiseLinear":
        values = as_float(values, "values")
        if bound is None:
            return cls(knots, values)  # checks the values itself
        check_finite(values, "values")  # before arctanh, which would turn a NaN into a NaN parameter
        v, b = concrete(values), _bound(bound)
        if v is not None and np.any(np.abs(v) >= b):
            raise ValueError(f"Every value must satisfy |g| < bound = {b}, got {v.tolist()}.")
        return cls(knots, jnp.arctanh(values / b), bound=b)

    @property
    def values(self):
        return self.raw if self.bound is None else self.bound * jnp.tanh(self.raw)

    def __call__(self, t):
        g = jnp.interp(jnp.asarray(t, self.raw.dtype), jnp.asarray(self.knots, self.raw.dtype), self.values)
        # Interpolating between two values equal to +-b can round one ulp past b.
        return g if self.bound is None else jnp.clip(g, -self.bound, self.bound)

    def sup_abs(self):
        return jnp.max(jnp.abs(self.values))  # a linear interpolant takes its extremes at the knots


class MonotoneSpline(Schedule):
    r"""A monotone cubic through monotone knot values (Fritsch-Carlson slopes).

    Knot values are $g_0 = g_{lo} + (g_{hi} - g_{lo}) c_0$, $g_i$ increasing by
    $(g_{hi} - g_{lo})\,\mathrm{softmax}(\rho)_i$, so they are monotone and inside
    $(g_{lo}, g_{hi})$ for every parameter value ($\rho$ has one entry more than there are
    knots; the last is the slack above the last knot). `decreasing=True` mirrors it. The
    interpolant is monotone between knots (Fritsch and Carlson 1980), so the whole
    schedule stays in the bounds; it is $C^1$.
    """

    knots: tuple = eqx.field(static=True)
    raw: jax.Array
    lo: float = eqx.field(static=True)
    hi: float = eqx.field(static=True)
    decreasing: bool = eqx.field(static=True)

    def __init__(self, knots, raw, *, lo, hi, decreasing: bool = False):
        self.knots = _knots(knots)
        self.raw = as_float(raw, "raw")
        check_finite(self.raw, "raw")
        if self.raw.shape != (len(self.knots) + 1,):
            raise ValueError(f"`raw` must have shape (len(knots) + 1,) = ({len(self.knots) + 1},), got {self.raw.shape}.")
        self.lo, self.hi = float(lo), float(hi)
        if not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"Need finite lo < hi, got lo={lo!r}, hi={hi!r}.")
        self.decreasing = decreasing

    @property
    def values(self):
        w = jax.nn.softmax(self.raw)
        frac = jnp.cumsum(w)[:-1]  # strictly inside (0, 1), increasing
        v = self.lo + (self.hi - self.lo) * frac
        return v[::-1] if self.decreasing else v

    def __call__(self, t):
        y = self.values
        x = jnp.asarray(self.knots, y.dtype)
        t = jnp.clip(jnp.asarray(t, y.dtype), x[0], x[-1])
        h = jnp.diff(x)
        delta = jnp.diff(y) / h
        # Fritsch-Carlson: harmonic-mean slopes at interior knots, zero where the secants change sign or vanish
        w1, w2 = 2 * h[1:] + h[:-1], h[1:] + 2 * h[:-1]
        same = delta[:-1] * delta[1:] > 0
        d_lo, d_hi = jnp.where(same, delta[:-1], 1.0), jnp.where(same, delta[1:], 1.0)
        interior = jnp.where(same, (w1 + w2) / (w1 / d_lo + w2 / d_hi), 0.0)
        m = jnp.concatenate([_edge(h[0], h[1], delta[0], delta[1]), interior, _edge(h[-1], h[-2], delta[-1], delta[-2])])
        i = jnp.clip(jnp.searchsorted(x, t, side="right") - 1, 0, x.shape[0] - 2)
        s = (t - x[i]) / h[i]
        h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
        return h00 * y[i] + h10 * h[i] * m[i] + h01 * y[i + 1] + h11 * h[i] * m[i + 1]

    def sup_abs(self):
        return jnp.max(jnp.abs(self.values))  # monotone between knots, constant beyond them


def _edge(h0, h1, m0, m1):
    """One-sided three-point end slope, limited to keep the cubic monotone (as SciPy's PCHIP)."""
    d = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
    d = jnp.where(jnp.sign(d) != jnp.sign(m0), 0.0, d)
    d = jnp.where((jnp.sign(m0) != jnp.sign(m1)) & (jnp.abs(d) > 3 * jnp.abs(m0)), 3 * m0, d)
    return d[None]


class Sum(Schedule):
    """$g(t) = \\sum_j g_j(t)$ (its `sup_abs` is None: the sum of the terms' is only an upper bound)."""

    terms: tuple

    def __call__(self, t):
        return sum(s(t) for s in self.terms)

    @property
    def jump_ts(self):
        jumps = [jnp.atleast_1d(s.jump_ts) for s in self.terms if getattr(s, "jump_ts", None) is not None]
        return jnp.concatenate(jumps) if jumps else None


class Scaled(Schedule):
    """$g(t) = c\\, s(t)$."""

    schedule: Schedule
    scale: jax.Array

    def __call__(self, t):
        return self.scale * self.schedule(t)

    def sup_abs(self):
        inner = _sup_abs(self.schedule)
        return None if inner is None else jnp.abs(self.scale) * inner

    @property
    def jump_ts(self):
        return getattr(self.schedule, "jump_ts", None)


class Bounded(Schedule):
    r"""$g(t) = b \tanh(s(t) / b)$: any schedule squashed into $(-b, b)$ (e.g. $b < \beta$ for eq 2)."""

    schedule: Schedule
    bound: float = eqx.field(static=True)

    def __init__(self, schedule, bound):
        self.schedule, self.bound = schedule, _bound(bound)

    def __call__(self, t):
        return self.bound * jnp.tanh(self.schedule(t) / self.bound)

    def sup_abs(self):
        inner = _sup_abs(self.schedule)
        return None if inner is None else self.bound * jnp.tanh(inner / self.bound)


def _sup_abs(schedule):
    """`schedule.sup_abs()` for a Schedule, None for any other callable."""
    return schedule.sup_abs() if isinstance(schedule, Schedule) else None

    @property
    def jump_ts(self):
        return getattr(self.schedule, "jump_ts", None)
