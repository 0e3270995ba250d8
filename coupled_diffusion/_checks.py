"""Eager parameter validation: static shapes always, values when they are concrete.

Under `jit`/`vmap` values are tracers; then only shapes are checked here and the
solvers report bad values through their `result` code instead.
"""

import jax
import jax.numpy as jnp
import numpy as np


def as_float(x, name: str):
    """`x` as a floating JAX array (keeps float32/float64; promotes integers)."""
    try:
        x = jnp.asarray(x)
    except TypeError as e:
        raise ValueError(f"`{name}` must be array-like of numbers, got {type(x).__name__}.") from e
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def concrete(x):
    """A NumPy copy of `x`, or `None` when `x` is being traced."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_finite(x, name: str) -> None:
    v = concrete(x)
    if v is not None and not np.all(np.isfinite(v)):
        raise ValueError(f"`{name}` must be finite, got {v.tolist()}.")


def check_positive(x, name: str, what: str = "positive") -> None:
    v = concrete(x)
    if v is not None and not np.all(v > 0):
        raise ValueError(f"`{name}` must be {what}, got {v.tolist()}.")


def check_times(t, name: str = "t") -> None:
    """Concrete forward times must be finite and >= 0."""
    v = concrete(t)
    if v is not None:
        v = np.asarray(v, float).reshape(-1)
        bad = v[~(np.isfinite(v) & (v >= 0))]
        if bad.size:
            raise ValueError(f"`{name}` must be finite forward times >= 0, got {bad[:8].tolist()}.")


def check_square(x, name: str) -> None:
    if x.ndim != 2 or x.shape[0] != x.shape[1] or x.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty square k x k matrix, got shape {x.shape}.")


def check_same_k(ou, data) -> None:
    """The forward process and the data must have the same number k of modalities."""
    if ou.k != data.k:
        raise ValueError(
            f"`ou` has k={ou.k} modalities but `data` has k={data.k}: the Gram matrix and "
            f"variances must be {ou.k} x {ou.k} and ({ou.k},)."
        )


def dim_scale(dim, dtype):
    """The factor that turns a per-dimension quantity into the finite-d one: 1 for `dim=None`, else `d >= 1`."""
    if dim is None:
        return jnp.asarray(1.0, dtype)
    dim = as_float(dim, "dim")
    d = concrete(dim)
    if d is not None and not (d.ndim == 0 and d >= 1):
        raise ValueError(f"`dim` must be a scalar >= 1 (the dimension d of each modality), got {d}.")
    return dim.astype(dtype)
