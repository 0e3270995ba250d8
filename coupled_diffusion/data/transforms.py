r"""The deterministic, pixel-aligned modality transforms T of Section 5 (eq 90).

Each maps a batch of images `(..., H, W)` with values in [0, 1] to the same shape and range,
in JAX (jit- and vmap-friendly): `edge` (Sobel gradient magnitude, scaled per image to a
maximum of 1), `invert` (1 - x), `dilate` (grey morphological dilation, a `(2r+1)^2` max
filter) and `blur` (Gaussian, zero padding, kernel truncated at `3 sigma`, rounded). Images are
zero-padded at the border, i.e. the background of MNIST continues.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _as_batch(x):
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"images must be (..., H, W), got shape {x.shape}.")
    lead = x.shape[:-2]
    return x.reshape((-1, 1) + x.shape[-2:]), lead


def _conv2d(x, k):
    """Cross-correlation of `(N, 1, H, W)` with a 2-D kernel, zero padding, same size."""
    k = jnp.asarray(k, x.dtype)[None, None]
    ph, pw = k.shape[-2] // 2, k.shape[-1] // 2
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((ph, ph), (pw, pw)), precision=jax.lax.Precision.HIGHEST)


def invert(x):
    """1 - x."""
    return 1.0 - jnp.asarray(x)


def edge(x):
    """Sobel gradient magnitude, divided by each image's maximum (an all-flat image maps to 0)."""
    b, lead = _as_batch(x)
    sx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    g = jnp.sqrt(_conv2d(b, sx) ** 2 + _conv2d(b, sx.T) ** 2)
    mx = jnp.max(g, axis=(-2, -1), keepdims=True)
    out = jnp.where(mx > 0, g / jnp.where(mx > 0, mx, 1.0), 0.0)
    return out.reshape(lead + out.shape[-2:])


def dilate(x, radius: int = 1):
    """Grey dilation with a `(2 radius + 1)`-square structuring element."""
    if not isinstance(radius, int) or radius < 1:
        raise ValueError(f"`radius` must be a positive integer, got {radius!r}.")
    b, lead = _as_batch(x)
    w = 2 * radius + 1
    out = jax.lax.reduce_window(b, -jnp.inf, jax.lax.max, (1, 1, w, w), (1, 1, 1, 1),
                                ((0, 0), (0, 0), (radius, radius), (radius, radius)))
    return out.reshape(lead + out.shape[-2:])


def blur(x, sigma: float = 1.0):
    """Gaussian blur (separable, normalised kernel of radius `round(3 sigma)`, zero padding)."""
    if not sigma > 0:
        raise ValueError(f"`sigma` must be positive, got {sigma!r}.")
    b, lead = _as_batch(x)
    r = int(3 * sigma + 0.5)  # SciPy's gaussian_filter radius for truncate=3
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    out = _conv2d(_conv2d(b, k[None, :]), k[:, None])
    return out.reshape(lead + out.shape[-2:])


TRANSFORMS: dict[str, Callable] = {"edge": edge, "invert": invert, "dilate": dilate, "blur": blur}


def get_transform(name: str, **kwargs) -> Callable:
    """The transform called `name` (one of `TRANSFORMS`), with keyword parameters bound."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; choose one of {sorted(TRANSFORMS)}.")
    return functools.partial(TRANSFORMS[name], **kwargs) if kwargs else TRANSFORMS[name]
