r"""Parameter sweeps: a function evaluated over a product grid, vmapped, chunked and sharded.

```python
res = cd.sweep(lambda g, theta: cd.speciation_time(cd.CoupledOU.anisotropic(1.0, g, 2.0),
                                                   cd.TwoClassMixture.from_angle(1.0, 1.0, theta),
                                                   throw=False).value,
               g=jnp.linspace(0, 2, 1024), theta=jnp.linspace(0, jnp.pi, 1024))
res.values            # shape (1024, 1024): axis 0 is g, axis 1 is theta (keyword order)
res.axes              # {"g": ..., "theta": ...}
res.sel(g=0.5)        # the nearest grid line, as a Sweep over the remaining axes
```

How it runs: the grid is flattened, padded to a whole number of chunks, and each chunk
is laid out over a 1-D `jax.sharding.Mesh` of the devices with a `NamedSharding`; the
jitted, vmapped function then runs on each device's own block with no cross-device
communication (under plain `jit` sharding, the `vmap` of a solver's while loop would
all-reduce its stopping condition at every iteration; `shard_map` is not usable with
optimistix's closure conversion), so one call evaluates `chunk_size` points on every
device at once; results are
gathered to the host chunk by chunk, so host and device memory stay bounded by the chunk.
The same code runs on one CPU, on fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`), or on a GPU/TPU host.

Multi-host: call `jax.distributed.initialize()` on every process first; `jax.devices()`
then lists every host's devices, the mesh spans them, and each process must call
`sweep` with the same arguments (the gathered result is replicated on every process).
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._checks import as_float


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A labelled result: `values` (a PyTree of arrays with the grid axes in front) and `axes`."""

    axes: dict
    values: object

    @property
    def dims(self) -> tuple:
        return tuple(self.axes)

    def sel(self, **points) -> "Sweep":
        """Select the grid line nearest to each given coordinate, dropping that axis."""
        index = []
        axes = {}
        for name, coords in self.axes.items():
            if name in points:
                index.append(int(np.argmin(np.abs(np.asarray(coords) - points[name]))))
            else:
                index.append(slice(None))
                axes[name] = coords
        unknown = set(points) - set(self.axes)
        if unknown:
            raise ValueError(f"Unknown axes {sorted(unknown)}; this sweep has {list(self.axes)}.")
        return Sweep(axes, jax.tree.map(lambda v: v[tuple(index)], self.values))

    def to_xarray(self):
        """As an `xarray.DataArray` (single-array results; needs `xarray` installed)."""
        import xarray

        if not isinstance(self.values, np.ndarray):
            raise ValueError("to_xarray needs a single-array result; index `values` first.")
        extra = [f"dim_{i}" for i in range(self.values.ndim - len(self.axes))]
        return xarray.DataArray(self.values, coords=self.axes, dims=list(self.axes) + extra)


@functools.lru_cache(maxsize=64)
def _compiled(fn, names):
    """One jitted, vmapped program per (function, axis names): repeated sweeps reuse it."""
    return jax.jit(jax.vmap(lambda *xs: fn(**dict(zip(names, xs)))))


def _run_sharded(batched, args, sharding):
    """Run `batched` on every device's own block of the sharded `args`, with no collectives.

    Each addressable shard is processed where it lives (dispatch is asynchronous, so the
    devices work in parallel) and the per-device outputs are reassembled into global arrays
    with the same sharding. Under plain `jit` sharding instead, the `vmap` of a solver's
    while loop would all-reduce its stopping condition across devices at every iteration
    (and on fake CPU devices that rendezvous can starve).
    """
    per_device = []
    for shards in zip(*(a.addressable_shards for a in args)):
        out = batched(*[s.data for s in shards])
        if shards[0].device.platform == "cpu":
            # CPU "devices" share one host's cores (and XLA's thread pool): concurrent while-loop
            # programs on them gain nothing and were seen to stall, so run them one after another
            jax.block_until_ready(out)
        per_device.append(out)
    n = args[0].shape[0]

    def assemble(*leaves):
        shape = (n,) + leaves[0].shape[1:]
        return jax.make_array_from_single_device_arrays(shape, sharding, list(leaves))

    return jax.tree.map(assemble, *per_device)


def _to_host(x):
    if jax.process_count() > 1:  # gather the shards of every host
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def sweep(fn: Callable, *, chunk_size: int = 65536, devices=None, **axes) -> Sweep:
    r"""Evaluate `fn(**point)` at every point of the product grid of `axes`.

    **Arguments:**

    - `fn`: a JAX-traceable function of scalar keyword arguments (one per axis) returning a
        PyTree of arrays (e.g. a scalar). It is `vmap`ped; it must not raise on a traced
        input (use `throw=False` for the solvers). The compiled program is cached per
        function object: pass the same `fn` again (not a fresh `lambda`) to reuse it.
    - `chunk_size`: points per device per call (bounds memory).
    - `devices`: the devices to shard over (default: all of `jax.devices()`).
    - `**axes`: 1-D coordinate arrays; the result's leading axes follow their order.

    **Returns:** a [`Sweep`][] with `values` of shape `(len(axis_1), ..., len(axis_n)) + out_shape`.
    """
    if not axes:
        raise ValueError("Give at least one axis, e.g. sweep(fn, g=jnp.linspace(0, 1, 64)).")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
    coords = {}
    for name, v in axes.items():
        v = np.asarray(as_float(v, name))
        if v.ndim != 1 or v.shape[0] == 0:
            raise ValueError(f"Axis `{name}` must be a non-empty 1-D array, got shape {v.shape}.")
        coords[name] = v
    names = list(coords)
    shape = tuple(len(v) for v in coords.values())
    n = int(np.prod(shape))
    devices = list(jax.devices() if devices is None else devices)
    mesh = Mesh(np.asarray(devices), ("points",))
    sharding = NamedSharding(mesh, PartitionSpec("points"))
    per_call = chunk_size * len(devices)
    per_call = min(per_call, -(-n // len(devices)) * len(devices))  # small grids: one call, no excess padding
    n_calls = -(-n // per_call)
    grids = np.meshgrid(*coords.values(), indexing="ij")
    flat = [np.concatenate([g.reshape(-1), np.full(n_calls * per_call - n, g.reshape(-1)[0])]) for g in grids]

    batched = _compiled(fn, tuple(names))
    outs = []
    for c in range(n_calls):
        args = [jax.device_put(jnp.asarray(f[c * per_call : (c + 1) * per_call]), sharding) for f in flat]
        outs.append(jax.tree.map(_to_host, _run_sharded(batched, args, sharding)))
    leaves = [np.concatenate(parts)[:n] for parts in zip(*(jax.tree.leaves(o) for o in outs))]
    values = jax.tree.unflatten(jax.tree.structure(outs[0]), [v.reshape(shape + v.shape[1:]) for v in leaves])
    return Sweep(coords, values)

