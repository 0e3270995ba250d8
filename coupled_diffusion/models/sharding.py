"""Data-parallel layout for the score networks: a 1-D device mesh, the batch split over it, parameters replicated.

```python
mesh = data_mesh()                          # all devices on one "data" axis
model = replicate(model, mesh)              # every parameter on every device
x, t, y = shard_batch((x, t, y), mesh)      # leading (batch) axis split over the devices
loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model, x, t, y)   # XLA inserts the gradient all-reduce
```

The batch size must be a multiple of the number of devices.

FSDP-style parameter sharding for the DiT uses its NNX partitioning annotations: build it under the
mesh and each device holds only a slice of every weight matrix; the same jitted step then runs
(XLA gathers the slices where a layer needs them and reduce-scatters the gradients).

```python
with jax.set_mesh(mesh):
    model = cd.DiT.from_config("DiT-XL/2", fsdp_axis="data", rngs=nnx.Rngs(0))
```
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh(devices=None, axis: str = "data") -> Mesh:
    """A 1-D mesh over `devices` (default: all of them) with one axis named `axis`."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (axis,))


def shard_batch(tree, mesh: Mesh):
    """Place every array in `tree` with its leading axis split over the mesh's (single) axis."""
    (axis,) = mesh.axis_names
    n = mesh.devices.size

    def put(x):
        if x.shape[0] % n:
            raise ValueError(f"The batch axis ({x.shape[0]}) must be a multiple of the device count ({n}).")
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(axis)))

    return jax.tree.map(put, tree)


def replicate(model, mesh: Mesh):
    """The NNX `model` with every variable replicated on all of the mesh's devices (in place, and returned)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
    return model
