r"""Brownian increments for fixed-step samplers, looked up by the index of the grid step.

Both paths are diffrax `AbstractBrownianPath`s whose `evaluate(t0, t1)` returns the increment
over the grid step that starts at `t0`, with index $i = \mathrm{round}((t_0 - \text{start}) /
\text{dt})$, scaled by $\sqrt{t_1 - t_0}$. Keying on the step index (not on a tree descent as
diffrax's `VirtualBrownianTree` does, nor on the bit pattern of the times as its
`UnsafeBrownianPath` does) makes every step one draw for the whole batch, and makes cloning
exact: clones that share a trajectory's past and draw their own future only need their own
key. [`GridBrownianPath`][] draws step $i$ from `fold_in(key, i)`; [`TabulatedBrownianPath`][]
reads it from a table (common random numbers).

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

INCREMENTS = ("gaussian", "rademacher")


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


class _SteppedPath(diffrax.AbstractBrownianPath):
    """The shared skeleton: an unbounded path whose increments are looked up by grid-step index."""

    start: eqx.AbstractVar[jax.Array]
    dt: eqx.AbstractVar[jax.Array]

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    def _draw(self, index, h, use_levy: bool):
        """The increment of step `index` over a step of length `h` (a Lévy area too, when asked and supported)."""
        raise NotImplementedError

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        del left
        if t1 is None:
            raise ValueError(f"{type(self).__name__} gives increments over a step; call evaluate(t0, t1).")
        index = jnp.round((t0 - self.start) / self.dt).astype(jnp.int32)
        return self._draw(index, t1 - t0, use_levy)


class GridBrownianPath(_SteppedPath):
    r"""Brownian increments on a uniform grid, one key per step: step $i$ draws from `fold_in(key, i)`.

    Use it with steps on that grid. With `levy_area=diffrax.SpaceTimeLevyArea` it also returns
    the space-time Lévy area $H \sim N(0, \Delta t / 12)$ needed by additive-noise Runge-Kutta
    solvers (ShARK).
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

    def _draw(self, index, h, use_levy):
        h = jnp.asarray(h, self.dtype)
        key = jax.random.fold_in(self.key, index)
        W = jnp.sqrt(h) * _unit_increments(key, self.shape, self.dtype, self.increments)
        if not use_levy:
            return W
        if self.levy_area is diffrax.SpaceTimeLevyArea:
            H = jnp.sqrt(h / 12) * jax.random.normal(jax.random.fold_in(key, 1), self.shape, self.dtype)
            return diffrax.SpaceTimeLevyArea(dt=h, W=W, H=H)
        return diffrax.BrownianIncrement(dt=h, W=W)


class TabulatedBrownianPath(_SteppedPath):
    r"""Brownian increments read from a table of unit draws: step $i$ is $\sqrt{t_1 - t_0}$ `table[i]`.

    For common random numbers: several solves (e.g. coupling schedules compared with a
    baseline) read the same table, so their differences carry no noise-to-noise variance.
    """

    table: jax.Array
    start: jax.Array
    dt: jax.Array
    levy_area: type = eqx.field(static=True)

    def __init__(self, table, start, dt, levy_area=diffrax.BrownianIncrement):
        self.table, self.start, self.dt, self.levy_area = table, start, dt, levy_area

    def _draw(self, index, h, use_levy):
        h = jnp.asarray(h, self.table.dtype)
        W = jnp.sqrt(h) * self.table[jnp.clip(index, 0, self.table.shape[0] - 1)]
        return diffrax.BrownianIncrement(dt=h, W=W) if use_levy else W
